"""Converter: parity with real Keras 3, both HDF5 layouts, round trips, the CLI and its errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import h5py
import keras
import keras_reference as kr
import numpy as np
import pytest
from keras.src.legacy.saving import legacy_h5_format
from tolerances import assert_close_to_scale

from cerebrum_jax.cli import main
from cerebrum_jax.data.labels import GLASGOW_CLASSES
from cerebrum_jax.model import keras as convert
from cerebrum_jax.model import network as model
from cerebrum_jax.model.checkpoint import load_checkpoint

SHAPE = (16, 16, 16)
SIZES = [(24, 7), (4, 3), (6, 9)]  # (n_filters, n_classes)
_CACHE: dict = {}


def keras_case(tmp_path_factory, n_filters: int, n_classes: int):
    """(path of a Keras 3 .h5 of the reference net with random weights, keras model, input, Keras softmax)."""
    key = (n_filters, n_classes)
    if key not in _CACHE:
        net = kr.build(n_filters, n_classes)
        kr.randomize(net, seed=n_filters * 100 + n_classes)
        path = tmp_path_factory.mktemp("keras") / f"ref_{n_filters}_{n_classes}.h5"
        net.save(path)
        x = np.random.default_rng(n_classes).normal(size=(2, *SHAPE, 1)).astype(np.float32)
        _CACHE[key] = (path, net, x, np.asarray(net.predict(x, verbose=0)))
    return _CACHE[key]


@pytest.fixture
def small(tmp_path_factory):
    return keras_case(tmp_path_factory, 4, 3)


def ours(params, config, x):
    return np.asarray(model.probabilities(params, config, x))


@pytest.mark.slow
@pytest.mark.parametrize("n_filters,n_classes", SIZES)
def test_parity_with_keras3_h5(tmp_path_factory, n_filters, n_classes):
    path, _, x, ref = keras_case(tmp_path_factory, n_filters, n_classes)
    params, config, info = convert.read_keras_h5(path)
    assert (config.n_filters, config.n_classes) == (n_filters, n_classes)
    assert info["layout"] == "keras3" and info["has_model_config"]
    # The random biases must not be zero, or the bias handling would go untested.
    assert all(np.abs(p["bias"]).min() > 0 for p in params.values())
    assert np.abs(ours(params, config, x) - ref).max() <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("n_filters,n_classes", SIZES[:1])  # the published width; the reader covers all
def test_parity_through_keras2_writer(tmp_path_factory, tmp_path, n_filters, n_classes):
    path, _, x, ref = keras_case(tmp_path_factory, n_filters, n_classes)
    params, config, _ = convert.read_keras_h5(path)
    out = convert.write_keras_h5(tmp_path / "k2.h5", params, config)
    with h5py.File(out) as f, h5py.File(path) as k3:
        assert f.attrs["keras_version"] == b"2.2.4" and f.attrs["backend"] == b"tensorflow"
        # Our Keras 2 graph has the layers (names, classes, order) Keras writes for the reference net.
        ours_graph, keras_graph = (
            [(e["name"], e["class_name"]) for e in json.loads(g.attrs["model_config"])["config"]["layers"]]
            for g in (f, k3)
        )
        assert ours_graph == keras_graph
        names = [n.decode() for n in f["model_weights/main_output"].attrs["weight_names"]]
        assert names == ["main_output/kernel:0", "main_output/bias:0"]
    params2, config2, info2 = convert.read_keras_h5(out)
    assert config2 == config and info2["layout"] == "keras2" and info2["keras_version"] == "2.2.4"
    assert np.abs(ours(params2, config2, x) - ref).max() <= 1e-5
    # Keras itself reads our Keras 2 layout, model_config included, and predicts the same.
    loaded = keras.models.load_model(out, compile=False)
    assert [layer.name for layer in loaded.layers if layer.weights] == list(model.LAYER_NAMES)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), ref, atol=1e-6)


@pytest.mark.slow
def test_round_trip_h5_orbax_h5_is_bit_identical(small, tmp_path):
    path = small[0]
    assert main(["convert", str(path), str(tmp_path / "ckpt")]) == 0
    assert main(["convert", "--to-keras", str(tmp_path / "ckpt"), str(tmp_path / "back.h5")]) == 0
    with h5py.File(path) as a, h5py.File(tmp_path / "back.h5") as b:
        for name in model.LAYER_NAMES:
            for part in ("kernel", "bias"):
                x = a[f"model_weights/{name}/{name}/{part}"][()]
                y = b[f"model_weights/{name}/{name}/{part}:0"][()]
                assert x.dtype == y.dtype == np.float32 and x.tobytes() == y.tobytes()
    ckpt = load_checkpoint(tmp_path / "ckpt")
    assert ckpt.meta["source_git_blob_sha1"] == convert.git_blob_id(path)
    assert ckpt.meta["keras_version"] == keras.__version__
    assert ckpt.classes == ["class_0", "class_1", "class_2"] and ckpt.normalization == "zscore"


@pytest.mark.slow
def test_weights_only_file(small, tmp_path):
    path, net, x, ref = small
    with h5py.File(tmp_path / "w.h5", "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, net)  # what model.save_weights('w.h5') wrote
    params, config, info = convert.read_keras_h5(tmp_path / "w.h5")
    assert not info["has_model_config"] and (config.n_filters, config.n_classes) == (4, 3)
    assert np.abs(ours(params, config, x) - ref).max() <= 1e-5


@pytest.mark.slow
def test_keras224_layout_with_split_attributes_and_optimizer_state(small, tmp_path):
    """The published file's quirks: layer_names split over layer_names0/1, optimizer_weights present."""
    params, config, _ = convert.read_keras_h5(small[0])
    out = convert.write_keras_h5(tmp_path / "m.h5", params, config)
    with h5py.File(out, "a") as f:
        g = f["model_weights"]
        names = g.attrs["layer_names"]
        del g.attrs["layer_names"]
        for i, part in enumerate(np.array_split(names, 3)):
            g.attrs[f"layer_names{i}"] = part
        opt = f.create_group("optimizer_weights")
        opt.attrs["weight_names"] = np.array([b"Adam/iterations:0"])
        opt.create_dataset("Adam/iterations:0", data=np.int64(7))
        f.attrs["training_config"] = b'{"loss": "categorical_crossentropy"}'
    params2, config2, info = convert.read_keras_h5(out)
    assert info["has_optimizer_weights"] and config2 == config
    for name in model.LAYER_NAMES:
        assert np.array_equal(params2[name]["kernel"], params[name]["kernel"])


@pytest.mark.slow
@pytest.mark.parametrize("s,cin,cout", [(2, 3, 5), (4, 2, 3), (4, 6, 1)])
def test_strided_conv_transpose_equals_keras_layer(s, cin, cout):
    layer = keras.layers.Conv3DTranspose(cout, s, strides=s, padding="same")
    x = np.random.default_rng(s + cin).normal(size=(2, 3, 2, 4, cin)).astype(np.float32)
    layer.build(x.shape)
    rng = np.random.default_rng(cout)
    kernel = rng.normal(size=(s, s, s, cout, cin)).astype(np.float32)
    bias = rng.normal(size=(cout,)).astype(np.float32)
    layer.set_weights([kernel, bias])
    ref = np.asarray(layer(x))
    assert_close_to_scale(model.strided_conv_transpose(x, kernel, bias), ref, 1e-5)  # the output's scale


@pytest.mark.slow
@pytest.mark.parametrize("s,cin,cout", [(2, 3, 5), (4, 2, 3)])
def test_strided_conv_equals_keras_layer(s, cin, cout):
    layer = keras.layers.Conv3D(cout, s, strides=s, padding="same")
    x = np.random.default_rng(s).normal(size=(1, 2 * s, 3 * s, s, cin)).astype(np.float32)
    layer.build(x.shape)
    rng = np.random.default_rng(cin)
    kernel = rng.normal(size=(s, s, s, cin, cout)).astype(np.float32)
    bias = rng.normal(size=(cout,)).astype(np.float32)
    layer.set_weights([kernel, bias])
    # sums of s^3 cin products of N(0, 1) values: float rounding relative to the output's scale
    assert_close_to_scale(model.strided_conv(x, kernel, bias), np.asarray(layer(x)), 1e-5)


# ---------------------------------------------------------------------------------------------
# Bad input: one line naming the file, exit 2, nothing written
# ---------------------------------------------------------------------------------------------


def _text_file(src, dst):
    dst.write_text("this is not HDF5\n")


def _truncated(src, dst):
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])


def _layer_missing(src, dst):
    shutil.copy(src, dst)
    with h5py.File(dst, "a") as f:
        g = f["model_weights"]
        g.attrs["layer_names"] = [n for n in g.attrs["layer_names"] if n != "enc_lvl2_block2_conv"]
        del g["enc_lvl2_block2_conv"]


def _wrong_kernel(src, dst):
    shutil.copy(src, dst)
    with h5py.File(dst, "a") as f:
        del f["model_weights/down_2to3_conv/down_2to3_conv/kernel"]
        f["model_weights/down_2to3_conv/down_2to3_conv/kernel"] = np.zeros((3, 3, 3, 8, 16), np.float32)


def _other_architecture(src, dst):
    inp = keras.Input((None, None, None, 1))
    out = keras.layers.Conv3D(2, 3, padding="same", name="conv_a")(inp)
    keras.Model(inp, keras.layers.Conv3D(3, 1, activation="softmax", name="conv_b")(out)).save(dst)


def _no_layer_names(src, dst):
    with h5py.File(dst, "w") as f:
        f["data"] = np.zeros(3)


BAD = [
    (_text_file, "not a readable HDF5"),
    (_truncated, "not a readable HDF5"),
    (_layer_missing, "enc_lvl2_block2_conv"),
    (_wrong_kernel, "down_2to3_conv: kernel has shape (3, 3, 3, 8, 16), expected (2, 2, 2, 8, 16)"),
    (_other_architecture, "not a CEREBRUM-7T"),
    (_no_layer_names, "no 'layer_names'"),
]


@pytest.mark.slow
@pytest.mark.parametrize("make,message", BAD, ids=[m.__name__.strip("_") for m, _ in BAD])
def test_bad_h5_exit_2_one_line_nothing_written(small, tmp_path, capsys, make, message):
    bad = tmp_path / "bad.h5"
    make(small[0], bad)
    with pytest.raises(convert.InputError, match="bad.h5"):
        convert.read_keras_h5(bad)
    capsys.readouterr()
    assert main(["convert", str(bad), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(bad) in err and message in err, err
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.h5"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "args,message",
    [
        (["missing.h5", "{out}"], "does not exist"),
        (["{src}"], "needs SOURCE and DEST"),
        (["{src}", "{out}", "--classes", "a,b"], "2 class names given for a model with 3 classes"),
        (["{src}", "{out}", "--mean", "{src}"], "--mean and --std must be given together"),
        (["{src}", "{out}", "--mean", "nope.nii.gz", "--std", "nope.nii.gz"], "does not exist"),
        (["--to-keras", "{tmp}/nockpt", "{tmp}/x.h5"], "checkpoint directory does not exist"),
        (["{tmp}", "{tmp}/out"], "is a directory, not an HDF5 file"),
        (["--to-keras", "{src}", "{tmp}/x.h5"], "is a file, not a checkpoint directory"),
    ],
)
def test_cli_usage_errors(small, tmp_path, capsys, args, message):
    fill = {"src": str(small[0]), "out": str(tmp_path / "out"), "tmp": str(tmp_path)}
    assert main(["convert", *(a.format(**fill) for a in args)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_cli_refuses_existing_outputs_unless_forced(small, tmp_path, capsys):
    out, h5 = tmp_path / "ckpt", tmp_path / "back.h5"
    assert main(["convert", str(small[0]), str(out)]) == 0
    assert main(["convert", str(small[0]), str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["convert", str(small[0]), str(out), "--force", "--classes", "x,y,z"]) == 0
    assert load_checkpoint(out).classes == ["x", "y", "z"]
    h5.write_bytes(b"keep")
    assert main(["convert", "--to-keras", str(out), str(h5)]) == 2
    assert h5.read_bytes() == b"keep"
    assert main(["convert", "--to-keras", str(out), str(h5), "--force"]) == 0
    assert convert.read_keras_h5(h5)[1].n_classes == 3


@pytest.mark.slow
def test_cli_normalization_volumes_and_class_file(small, tmp_path):
    import nibabel as nib

    rng = np.random.default_rng(0)
    mean = rng.normal(size=SHAPE).astype(np.float32)
    std = np.abs(rng.normal(size=SHAPE)).astype(np.float32)
    std[0, 0, :4] = 0.0
    for name, vol in (("mean", mean), ("std", std)):
        nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / f"{name}.nii.gz")
    (tmp_path / "dseg.tsv").write_text("index\tname\n0\tbg\n1\tgrey matter\n2\twm\n")
    args = ["--mean", str(tmp_path / "mean.nii.gz"), "--std", str(tmp_path / "std.nii.gz")]
    args += ["--classes", str(tmp_path / "dseg.tsv")]
    assert main(["convert", str(small[0]), str(tmp_path / "ckpt"), *args]) == 0
    ckpt = load_checkpoint(tmp_path / "ckpt")
    assert ckpt.normalization == "voxelwise" and ckpt.classes == ["bg", "grey matter", "wm"]
    np.testing.assert_array_equal(ckpt.norm_volumes["mean"], mean)
    np.testing.assert_array_equal(ckpt.norm_volumes["std"], np.where(std == 0, 1.0, std))


@pytest.mark.slow
def test_glasgow_class_names_by_default_for_7_classes(tmp_path_factory, tmp_path):
    path = keras_case(tmp_path_factory, 24, 7)[0]
    assert main(["convert", str(path), str(tmp_path / "ckpt")]) == 0
    assert load_checkpoint(tmp_path / "ckpt").classes == list(GLASGOW_CLASSES)


# ---------------------------------------------------------------------------------------------
# --download: verified against a git blob id; offline -> one sentence, exit 2
# ---------------------------------------------------------------------------------------------


def test_git_blob_id_matches_git(tmp_path):
    (tmp_path / "f").write_bytes(b"hello\n")
    if shutil.which("git") is None:
        pytest.fail("git is needed to check the blob id")
    got = subprocess.run(["git", "hash-object", str(tmp_path / "f")], capture_output=True, text=True).stdout
    assert convert.git_blob_id(tmp_path / "f") == got.strip()


@pytest.mark.slow
def test_download_verifies_and_converts(small, tmp_path):
    blob = convert.git_blob_id(small[0])
    h5, out = tmp_path / "w" / "model_trained.h5", tmp_path / "w" / "glasgow"
    args = ["convert", "--download", str(out), "--url", small[0].as_uri(), "--blob-id", blob]
    assert main(args) == 0
    assert h5.read_bytes() == small[0].read_bytes() and not h5.with_name(h5.name + ".part").exists()
    meta = json.loads((out / "cerebrum.json").read_text())
    assert meta["source_git_blob_sha1"] == blob and meta["source_url"] == small[0].as_uri()
    # Second time: the local file is used, even with an unreachable URL.
    shutil.rmtree(out)
    assert main([*args[:3], "--url", "file:///nonexistent/x.h5", "--blob-id", blob]) == 0


@pytest.mark.slow
@pytest.mark.parametrize("local", [False, True])
def test_download_wrong_blob_id(small, tmp_path, capsys, local):
    h5 = tmp_path / "model_trained.h5"
    if local:
        shutil.copy(small[0], h5)
    args = ["convert", "--download", str(tmp_path / "out"), "--h5", str(h5), "--url", small[0].as_uri()]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and convert.GLASGOW_BLOB_ID in err and str(h5) in err
    assert h5.exists() == local  # a bad download is removed, a local file left alone
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_download_offline_one_sentence_no_traceback(tmp_path):
    cmd = [sys.executable, "-m", "cerebrum_jax", "convert", "--download", str(tmp_path / "glasgow")]
    cmd += ["--url", "file:///nonexistent/model_trained.h5"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert (
        r.stderr.count("\n") == 1 and "by hand" in r.stderr and str(tmp_path / "model_trained.h5") in r.stderr
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(12, 16, 16), (16, 16, 10)])
def test_cli_normalization_volumes_off_the_grid_are_refused(small, tmp_path, capsys, shape):
    """Voxelwise mean/std volumes set segment's grid, so each axis must be a multiple of 8."""
    import nibabel as nib

    for name in ("mean", "std"):
        nib.save(nib.Nifti1Image(np.ones(shape, np.float32), np.eye(4)), tmp_path / f"{name}.nii.gz")
    args = ["--mean", str(tmp_path / "mean.nii.gz"), "--std", str(tmp_path / "std.nii.gz")]
    assert main(["convert", str(small[0]), str(tmp_path / "ckpt"), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(tmp_path / "mean.nii.gz") in err and "multiple of 8" in err, err
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.slow
def test_dropout_rates_agree_with_the_keras_reference():
    """Keras reference net (the original's rates), our Keras 2 writer and the Flax model: one placement."""
    config = model.ModelConfig(n_filters=2, n_classes=3, dropout_rate=0.1)
    ref = {
        layer.name: layer.rate for layer in kr.build(2, 3, dropout=0.1).layers if layer.name.endswith("_dr")
    }
    written = {
        e["name"]: e["config"]["rate"]
        for e in convert.keras2_model_config(config)["config"]["layers"]
        if e["class_name"] == "Dropout"
    }
    ours = {n.removesuffix("_conv") + "_dr": model.dropout_rate(n, config) for n in model.LAYER_NAMES[:-1]}
    assert ref == written == ours
    assert ref["down_1to2_dr"] == 0.0 and ref["up_2to1_dr"] == 0.1
