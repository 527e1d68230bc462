"""The cerebrum-jax command as a whole: outputs that cannot be written, --force limits, help texts."""

from __future__ import annotations

import jax
import nibabel as nib
import numpy as np
import pytest

from cerebrum_jax.cli import build_parser, main
from cerebrum_jax.model import keras as convert
from cerebrum_jax.model import network as model
from cerebrum_jax.model.checkpoint import save_checkpoint

CONFIG = model.ModelConfig(n_filters=2, n_classes=3)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A Keras .h5, a checkpoint and a NIfTI volume, made without Keras."""
    root = tmp_path_factory.mktemp("cli")
    params = model.init_params(CONFIG, jax.random.key(0))
    h5 = convert.write_keras_h5(root / "good.h5", params, CONFIG)
    ck = save_checkpoint(root / "ck", params, CONFIG)
    img = root / "in.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((8, 8, 8), np.float32), np.eye(4)), img)
    return {"h5": str(h5), "ck": str(ck), "img": str(img)}


# (argv with {h5}/{ck}/{img}/{tmp} placeholders, text the one error line must hold)
CASES = [
    (["segment", "--weights", "{ck}", "{img}", "--out", "/proc/nope/o"], "/proc/nope"),
    (["convert", "{h5}", "/proc/nope/ck"], "/proc/nope"),
    (["convert", "--to-keras", "{ck}", "/proc/nope/x.h5"], "/proc/nope"),
    (
        ["convert", "--to-keras", "{ck}", "{tmp}/adir", "--force"],
        "adir: is a directory; --force replaces only",
    ),
    (["convert", "{h5}", "{tmp}/afile", "--force"], "afile: is a file; --force replaces only a checkpoint"),
    (["convert", "{h5}", "{tmp}/adir", "--force"], "adir: is a directory without cerebrum.json"),
    (["convert", "{tmp}/adir", "{tmp}/ck2"], "adir: is a directory, not an HDF5 file"),
]


@pytest.mark.parametrize(
    "argv,message", CASES, ids=[" ".join(a[:2]) + f" {i}" for i, (a, _) in enumerate(CASES)]
)
@pytest.mark.slow
def test_unwritable_or_wrong_outputs_one_line_exit_2(files, tmp_path, capsys, argv, message):
    (tmp_path / "adir").mkdir()
    (tmp_path / "adir" / "keep.txt").write_text("keep")
    (tmp_path / "afile").write_text("keep")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert main([a.format(tmp=tmp_path, **files) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and message in err, err
    assert err.startswith(f"cerebrum-jax {argv[0]}: error: ")
    assert (
        sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    )  # nothing written or removed
    assert (tmp_path / "adir" / "keep.txt").read_text() == (tmp_path / "afile").read_text() == "keep"


def test_os_error_line_names_the_path():
    from cerebrum_jax.cli import os_error_line

    assert os_error_line(PermissionError(13, "Permission denied", "/x/y")) == "/x/y: Permission denied"
    assert os_error_line(OSError(18, "Invalid cross-device link", "a", None, "b")) == (
        "a -> b: Invalid cross-device link"
    )
    assert os_error_line(OSError("disk\nfull")) == "disk full"


def test_help_texts_name_no_missing_subcommand(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "make bench" in text and "benchmark against PyTorch." not in text


def test_shared_options_take_their_help_as_keywords():
    """cli.options: a subcommand words the shared options its own way, without argparse internals; the
    library's configure gets the parsed values."""
    import argparse

    from cerebrum_jax.cli import options
    from cerebrum_jax.parallel import sharding

    sub = argparse.ArgumentParser(prog="x").add_subparsers()
    p = options.command(sub, "demo", lambda args: 0, help="h", description="d")
    options.add_performance_args(p, mesh_help="MESH-HELP", remat_help="REMAT-HELP")
    options.add_distributed_args(p)
    text = " ".join(p.format_help().split())
    assert "MESH-HELP" in text and "REMAT-HELP" in text and options.PRECISION_HELP in text
    args = p.parse_args(["--precision", "bf16", "--remat", "--coordinator", "h:1"])
    assert args.func(args) == 0 and args.coordinator == "h:1" and args.init_timeout == 300
    config, mesh = options.performance_options(args, CONFIG, jax.devices()[:1])
    assert (config.compute_dtype, config.remat, mesh.shape["space"]) == ("bfloat16", True, 1)
    assert sharding.configure(CONFIG, devices=jax.devices()[:1])[0] == CONFIG


@pytest.mark.parametrize(
    "flag, expected",
    [
        (["--skeleton-classes", "auto"], None),
        (["--skeleton-classes", "none"], ()),
        (["--skeleton-classes", "vessels, sagittal sinus"], ("vessels", "sagittal sinus")),
        ([], None),  # the config's default: automatic
    ],
)
def test_finetune_skeleton_classes_flag(flag, expected):
    from cerebrum_jax.cli import finetune as cli_finetune

    args = build_parser().parse_args(["finetune", "--config", "schneider19", *flag])
    cfg = cli_finetune.resolve(args)[0]
    assert cfg.skeleton_classes == (expected if flag else ())  # schneider19: the paper's loss, no term
