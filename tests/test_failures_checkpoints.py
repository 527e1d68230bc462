"""Checkpoints are input too (issue 21): a checkpoint's state/ is verified against its digest on every path
that reads it, cerebrum.json is validated field by field, Orbax's failures are one line, and a Keras .h5
of the wrong form is refused; each through the real command line, one line, exit status 2, nothing
written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from failure_kit import (  # noqa: F401  (files: a fixture)
    REPO_ROOT,
    files,
    finetune_args,
    one_error_line,
    stored_run,
    tree,
)

from cerebrum_jax.cli import main
from cerebrum_jax.model import checkpoint

MISMATCH = "does not match the sha256 recorded in cerebrum.json"
UNVERIFIED = "no state_sha256 in cerebrum.json (a checkpoint from before digests): state/ not verified"


def copy_ck(files, tmp_path: Path, name: str = "ck") -> Path:
    """A copy of the fixture's (digested, version 2) checkpoint to spoil."""
    return Path(shutil.copytree(files["ck"], tmp_path / name))


def edit_meta(ck: Path, change) -> None:
    """Rewrite ck/cerebrum.json with ``change(info)`` applied: it edits the dict in place (whatever it
    returns, a popped value say, is ignored) or returns a list to be written instead."""
    info = json.loads((ck / "cerebrum.json").read_text())
    new = change(info)
    (ck / "cerebrum.json").write_text(json.dumps(new if isinstance(new, list) else info))


def undigested(ck: Path) -> None:
    """Make ``ck`` a checkpoint from before digests: version 1, no state_sha256."""
    edit_meta(ck, lambda i: i.update(version=1) or i.pop("state_sha256"))


def data_files(ck: Path) -> list[Path]:
    """The Orbax data files of ck/state (the largest first: they hold the parameters)."""
    found = [p for p in (ck / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    return sorted(found, key=lambda p: -p.stat().st_size)


def flip_byte(ck: Path) -> None:
    f = data_files(ck)[0]
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))


def segment_args(ck, files, out, *more) -> list[str]:
    return ["segment", "--weights", str(ck), *more, "--out", str(out), str(files["img"])]


# ----------------------------------------------------------------------------------------------------------
# Integrity: the digest, on every path that reads a checkpoint


def _truncate(ck):
    f = data_files(ck)[0]
    f.write_bytes(f.read_bytes()[:10])


def _extra_file(ck):
    (ck / "state" / "notes.txt").write_text("not Orbax's\n")


def _deleted_file(ck):
    data_files(ck)[0].unlink()


def _no_state(ck):
    shutil.rmtree(ck / "state")


def _downgrade(ck):  # the digest key deleted and a byte flipped: a version-2 record must carry its digest
    edit_meta(ck, lambda i: i.pop("state_sha256"))
    flip_byte(ck)


INTEGRITY = [
    (flip_byte, MISMATCH),
    (_truncate, MISMATCH),
    (_extra_file, MISMATCH),
    (_deleted_file, MISMATCH),
    (_no_state, "has no state/ directory"),
    (_downgrade, "cerebrum.json: state_sha256 must be 64 hex digits (version 2 records carry it), got None"),
]
INTEGRITY_IDS = [f.__name__.strip("_") for f, _ in INTEGRITY]


@pytest.mark.parametrize("spoil,message", INTEGRITY, ids=INTEGRITY_IDS)
def test_segment_refuses_a_corrupt_checkpoint(files, tmp_path, capsys, spoil, message):
    ck = copy_ck(files, tmp_path)
    spoil(ck)
    before = tree(tmp_path)
    err = one_error_line(capsys, main(segment_args(ck, files, tmp_path / "seg")), message)
    assert str(ck) in err
    assert tree(tmp_path) == before


@pytest.mark.parametrize("spoil,message", INTEGRITY[:3], ids=INTEGRITY_IDS[:3])
def test_convert_to_keras_refuses_a_corrupt_checkpoint(files, tmp_path, capsys, spoil, message):
    ck = copy_ck(files, tmp_path)
    spoil(ck)
    before = tree(tmp_path)
    one_error_line(capsys, main(["convert", "--to-keras", str(ck), str(tmp_path / "out.h5")]), message)
    assert tree(tmp_path) == before  # no out.h5


def test_convert_to_keras_refuses_an_undigested_checkpoint(files, tmp_path, capsys):
    ck = copy_ck(files, tmp_path)
    undigested(ck)
    before = tree(tmp_path)
    code = main(["convert", "--to-keras", str(ck), str(tmp_path / "out.h5")])
    one_error_line(capsys, code, "state/ cannot be verified; not converted")
    assert tree(tmp_path) == before


@pytest.mark.parametrize(
    "spoil,message", INTEGRITY[:1] + INTEGRITY[-1:], ids=INTEGRITY_IDS[:1] + ["downgrade"]
)
def test_finetune_refuses_corrupt_weights(files, tmp_path, capsys, spoil, message):
    ck = copy_ck(files, tmp_path)
    spoil(ck)
    args = finetune_args(files, tmp_path / "out")
    args[args.index("--weights") + 1] = str(ck)
    before = tree(files["data"])
    one_error_line(capsys, main(args), message)
    assert tree(files["data"]) == before
    assert not list((tmp_path / "out").rglob("checkpoints/*"))  # nothing trained, nothing saved


def test_an_undigested_checkpoint_loads_with_one_warning(files, tmp_path, capsys):
    """A version-1 checkpoint from before digests: segmented, after one warning line on stderr."""
    ck = copy_ck(files, tmp_path)
    undigested(ck)
    assert main(segment_args(ck, files, tmp_path / "seg")) == 0
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"warning: {ck}: {UNVERIFIED}"], err
    assert list((tmp_path / "seg").glob("*dseg.nii.gz"))


@pytest.mark.slow  # one epoch of fine-tuning
def test_finetune_from_undigested_weights_warns_once_in_its_log(files, tmp_path, capsys):
    ck = copy_ck(files, tmp_path)
    undigested(ck)
    args = finetune_args(files, tmp_path / "out")
    args[args.index("--weights") + 1] = str(ck)
    assert main(args) == 0, capsys.readouterr().err
    log = (tmp_path / "out" / "fold-1" / "log.txt").read_text()
    assert log.count(UNVERIFIED) == 1 and f"{ck}: {UNVERIFIED}" in log, log


def test_the_digest_covers_every_file_of_state(files, tmp_path):
    """The digest changes with each file's name, size and bytes, and with files added or removed."""
    ck = copy_ck(files, tmp_path)
    state = ck / "state"
    digests = {checkpoint.state_digest(state)}
    (state / "extra").write_bytes(b"")
    digests.add(checkpoint.state_digest(state))
    (state / "extra").rename(state / "other")
    digests.add(checkpoint.state_digest(state))
    (state / "other").write_bytes(b"\0")
    digests.add(checkpoint.state_digest(state))
    (state / "other").unlink()
    data_files(ck)[-1].unlink()
    digests.add(checkpoint.state_digest(state))
    assert len(digests) == 5


@pytest.mark.parametrize("ck_dir", sorted(p.parent for p in (REPO_ROOT / "weights").glob("*/cerebrum.json")))
def test_shipped_checkpoints_carry_a_digest_that_verifies(ck_dir):
    info = json.loads((ck_dir / "cerebrum.json").read_text())
    assert info["version"] == checkpoint.VERSION
    assert info["state_sha256"] == checkpoint.state_digest(ck_dir / "state")
    warnings = []
    ckpt = checkpoint.load_checkpoint(ck_dir, require_digest=True, warn=warnings.append)
    assert warnings == [] and len(ckpt.classes) == ckpt.config.n_classes


def test_at_least_one_checkpoint_is_shipped():
    assert (REPO_ROOT / "weights" / "demo" / "cerebrum.json").is_file()


# ----------------------------------------------------------------------------------------------------------
# Metadata: one schema for cerebrum.json


def _set(key, value):
    return lambda info: info.update({key: value})


def _drop(key):
    return lambda info: info.pop(key) and None


def _model(key, value):
    return lambda info: info["model"].update({key: value})


def _pre(**fields):
    record = {"mask": "none", "crop": "none", "margin": 4, "grid": None, "voxel_mm": None}
    return lambda info: info.update(preprocessing={**record, "normalization": "zscore", **fields})


META = [
    ("array", lambda info: [info], "cerebrum.json is not a cerebrum-jax-checkpoint description"),
    ("no model", _drop("model"), "cerebrum.json: model must be an object, got None"),
    ("no classes", _drop("classes"), "cerebrum.json: classes must be a list of 3 distinct names"),
    ("n_filters abc", _model("n_filters", "abc"), "model.n_filters must be an integer >= 1, got 'abc'"),
    ("n_classes 0", _model("n_classes", 0), "model.n_classes must be an integer >= 2, got 0"),
    ("model list", _set("model", [1, 2]), "model must be an object, got [1, 2]"),
    (
        "classes string",
        _set("classes", "abc"),
        "classes must be a list of 3 distinct names (model.n_classes), got 'abc'",
    ),
    ("class count", _set("classes", ["a", "b"]), "classes must be a list of 3 distinct names"),
    ("class repeated", _set("classes", ["a", "a", "b"]), "classes must be a list of 3 distinct names"),
    ("mask", _pre(mask="skull"), "preprocessing.mask must be one of none, file, labels, got 'skull'"),
    ("grid 7", _pre(grid=[7, 7, 7]), "preprocessing.grid must be 3 positive multiples of 8 or null"),
    ("voxel negative", _pre(voxel_mm=-1.0), "preprocessing.voxel_mm must be a positive number (mm) or null"),
    ("voxel list", _pre(voxel_mm=[1, 1, 1]), "preprocessing.voxel_mm must be a positive number"),
    ("preprocessing list", _set("preprocessing", [1]), "preprocessing must be an object"),
    (
        "train_voxel_mm",
        _set("train_voxel_mm", "abc"),
        "train_voxel_mm must be 3 positive numbers (mm), got 'abc'",
    ),
    (
        "compute_dtype",
        _model("compute_dtype", "float16"),
        "model.compute_dtype must be one of float32, bfloat16",
    ),
    ("activation", _model("enc_activation", "swish2"), "model.enc_activation must be one of"),
    ("dropout 5", _model("dropout_rate", 5), "model.dropout_rate must be a number in [0, 1), got 5"),
    ("remat", _model("remat", "yes"), "model.remat must be true or false"),
    ("normalization", _set("normalization", "minmax"), "normalization must be one of"),
    ("version", _set("version", 3), "cerebrum.json: version must be one of 1, 2, got 3"),
    ("digest garbage", _set("state_sha256", "abc"), "state_sha256 must be 64 hex digits"),
]


@pytest.mark.parametrize("change,message", [m[1:] for m in META], ids=[m[0] for m in META])
def test_segment_refuses_a_malformed_cerebrum_json(files, tmp_path, capsys, change, message):
    ck = copy_ck(files, tmp_path)
    edit_meta(ck, change)
    before = tree(tmp_path)
    err = one_error_line(capsys, main(segment_args(ck, files, tmp_path / "seg")), message)
    assert err.startswith(f"cerebrum-jax segment: error: {ck}: ") or f"{ck}: " in err
    assert tree(tmp_path) == before


def test_a_valid_preprocessing_record_passes_the_schema(files, tmp_path):
    ck = copy_ck(files, tmp_path)
    edit_meta(ck, _pre(mask="file", crop="box", grid=[16, 8, 24], voxel_mm=0.75))
    edit_meta(ck, _set("train_voxel_mm", [1.0, 0.5, 2]))
    info = checkpoint.read_meta(ck)
    assert info["preprocessing"]["grid"] == [16, 8, 24]


# ----------------------------------------------------------------------------------------------------------
# Ensembles, Orbax failures in a real process, resume


def test_ensemble_with_other_classes_is_refused_in_one_line(files, tmp_path, capsys):
    a, b = copy_ck(files, tmp_path, "a"), copy_ck(files, tmp_path, "b")
    edit_meta(b, _set("classes", ["bg", "wm", "gm"]))
    before = tree(tmp_path)
    code = main(["segment", "--weights", str(a), str(b), "--out", str(tmp_path / "seg"), str(files["img"])])
    err = one_error_line(
        capsys, code, "classes ['bg', 'wm', 'gm'] differ from ['class_0', 'class_1', 'class_2']"
    )
    assert f"{b}: " in err and f"of {a}" in err
    assert tree(tmp_path) == before


def _orbax_unreadable(ck: Path, digested: bool) -> None:
    """Delete the Orbax data files of ck/state (its restore fails while others of its reads are still in
    flight); re-record the digest for a checkpoint that was written that way, so that Orbax sees it."""
    for f in (ck / "state" / "d").iterdir():
        f.unlink()
    if digested:
        edit_meta(ck, lambda i: i.update(state_sha256=checkpoint.state_digest(ck / "state")))
    else:
        undigested(ck)


@pytest.mark.slow  # a second Python process importing jax
@pytest.mark.parametrize("digested", [True, False], ids=["digested", "undigested"])
def test_orbax_restore_failure_is_one_line_in_a_real_process(files, tmp_path, digested):
    ck = copy_ck(files, tmp_path)
    _orbax_unreadable(ck, digested)
    before = tree(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    cmd = [sys.executable, "-m", "cerebrum_jax", *segment_args(ck, files, tmp_path / "seg")]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    lines = p.stderr.strip().splitlines()
    expected = 1 if digested else 2  # the undigested one: its "not verified" warning first
    assert p.returncode == 2 and len(lines) == expected and "Traceback" not in p.stderr, p.stderr
    assert f"{ck}: cannot restore Orbax state (" in lines[-1] and "Event loop is closed" not in p.stderr
    assert digested or lines[0] == f"warning: {ck}: {UNVERIFIED}"
    assert tree(tmp_path) == before


def _last_state(files, tmp_path: Path) -> tuple[Path, dict]:
    """A stored run whose checkpoints/last has a state/ (bytes) and the loop record a run writes."""
    run = stored_run(files, tmp_path / "r")
    last = run / "checkpoints" / "last"
    (last / "state").mkdir()
    (last / "state" / "x").write_bytes(b"1234")
    loop = {"phase": 0, "next_epoch": 1, "controller": None, "best": 1.0, "history": []}
    return run, loop


@pytest.mark.parametrize(
    "case,message",
    [
        (
            "digest deleted",
            "loop.json: corrupt loop.json: no 'state_sha256' of state/; the run cannot be resumed",
        ),
        ("digest deleted, byte flipped", "corrupt loop.json: no 'state_sha256' of state/"),
        ("digest null", "corrupt loop.json: no 'state_sha256' of state/"),
        ("byte flipped", "state/ is missing or does not match the sha256 in loop.json"),
    ],
)
def test_resume_refuses_a_last_state_without_its_digest(files, tmp_path, capsys, case, message):
    run, loop = _last_state(files, tmp_path)
    last = run / "checkpoints" / "last"
    digest = checkpoint.state_digest(last / "state")
    if "flipped" in case:
        (last / "state" / "x").write_bytes(b"1235")
    if case == "digest null":
        loop["state_sha256"] = None
    elif case == "byte flipped":
        loop["state_sha256"] = digest
    (last / "loop.json").write_text(json.dumps(loop))
    before = tree(run)
    one_error_line(capsys, main(finetune_args(files, tmp_path / "r", "--resume")), message)
    assert tree(run) == before


# ----------------------------------------------------------------------------------------------------------
# Keras .h5 files of the wrong form


def _h5_copy(files, tmp_path: Path) -> Path:
    return Path(shutil.copy(files["h5"], tmp_path / "bad.h5"))


def _model_config(h5: Path, change) -> None:
    with h5py.File(h5, "a") as f:
        cfg = json.loads(f.attrs["model_config"])
        change(cfg)
        f.attrs["model_config"] = json.dumps(cfg)


def _layers_ints(cfg):
    cfg["config"]["layers"] = [1, 2, 3]


def _main_output_config_list(cfg):
    next(e for e in cfg["config"]["layers"] if e["name"] == "main_output")["config"] = [1, 2]


def _scalar_kernel(h5: Path, keep_model_config: bool) -> None:
    with h5py.File(h5, "a") as f:
        root = f["model_weights"] if "model_weights" in f else f
        group = root["main_output"]
        name = next(n for n in group.attrs["weight_names"] if "kernel" in str(n))
        name = name.decode() if isinstance(name, bytes) else name
        del group[name]
        group[name] = np.float32(1.0)
        if not keep_model_config:
            del f.attrs["model_config"]


H5 = [
    ("layers ints", lambda h5: _model_config(h5, _layers_ints), "its layers must be objects with a 'config'"),
    ("main_output config list", lambda h5: _model_config(h5, _main_output_config_list), "a 'config' object"),
    ("main_output kernel scalar", lambda h5: _scalar_kernel(h5, True), "main_output: kernel has shape ()"),
    ("weights-only scalar kernel", lambda h5: _scalar_kernel(h5, False), "main_output: kernel has shape ()"),
]


@pytest.mark.parametrize("spoil,message", [h[1:] for h in H5], ids=[h[0] for h in H5])
def test_convert_refuses_a_malformed_h5(files, tmp_path, capsys, spoil, message):
    h5 = _h5_copy(files, tmp_path)
    spoil(h5)
    before = tree(tmp_path)
    err = one_error_line(capsys, main(["convert", str(h5), str(tmp_path / "out")]), message)
    assert str(h5) in err
    assert tree(tmp_path) == before
