"""Orbax checkpoints: round trips, refusing to overwrite, corrupt metadata, atomic writes."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from cerebrum_jax.errors import InputError
from cerebrum_jax.model import checkpoint
from cerebrum_jax.model.checkpoint import load_checkpoint, save_checkpoint
from cerebrum_jax.model.network import ModelConfig


@pytest.fixture(scope="module")
def params(tiny_params):
    return tiny_params


def _equal_trees(a, b) -> bool:
    same = jax.tree_util.tree_map(lambda x, y: np.array_equal(np.asarray(x), np.asarray(y)), a, b)
    return jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b) and all(
        jax.tree_util.tree_leaves(same)
    )


@pytest.mark.parametrize(
    "config,classes,normalization,with_volumes,meta",
    [
        (ModelConfig(n_filters=2, n_classes=3), ["bg", "gm", "wm"], "zscore", False, {"source": "x.h5"}),
        (ModelConfig(n_filters=2, n_classes=3, enc_activation="elu"), None, "voxelwise", True, {}),
        (
            ModelConfig(n_filters=2, n_classes=3, dropout_rate=0.0),
            ["a", "b", "c"],
            "none",
            False,
            {"epochs": 3},
        ),
    ],
)
@pytest.mark.slow
def test_round_trip(tmp_path, params, config, classes, normalization, with_volumes, meta):
    rng = np.random.default_rng(1)
    volumes = (
        {k: rng.normal(size=(8, 16, 8)).astype(np.float32) for k in ("mean", "std")} if with_volumes else None
    )
    out = save_checkpoint(
        tmp_path / "ckpt",
        params,
        config,
        classes=classes,
        normalization=normalization,
        norm_volumes=volumes,
        meta=meta,
    )
    ck = load_checkpoint(out)
    assert _equal_trees(ck.params, jax.tree_util.tree_map(np.asarray, params))
    assert all(leaf.dtype == np.float32 for leaf in jax.tree_util.tree_leaves(ck.params))
    assert ck.config == config and ck.normalization == normalization and ck.meta == meta
    assert ck.classes == (classes or [f"class_{i}" for i in range(config.n_classes)])
    if with_volumes:
        assert _equal_trees(ck.norm_volumes, volumes)
    else:
        assert ck.norm_volumes is None


def test_refuses_to_overwrite_unless_asked(tmp_path, params):
    config = ModelConfig(n_filters=2, n_classes=3)
    path = save_checkpoint(tmp_path / "ckpt", params, config, classes=["a", "b", "c"])
    with pytest.raises(InputError, match="already exists"):
        save_checkpoint(path, params, config)
    assert load_checkpoint(path).classes == ["a", "b", "c"]  # untouched
    save_checkpoint(path, params, config, classes=["x", "y", "z"], overwrite=True)
    assert load_checkpoint(path).classes == ["x", "y", "z"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary or old directories left


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda p: (p / checkpoint.META_FILE).unlink(), "no cerebrum.json"),
        (lambda p: (p / checkpoint.META_FILE).write_text("{not json"), "corrupt cerebrum.json"),
        (lambda p: (p / checkpoint.META_FILE).write_text(json.dumps({"format": "other"})), "is not a"),
        (lambda p: (p / checkpoint.META_FILE).write_bytes(b"\xff\xfe\x00"), "corrupt cerebrum.json"),
    ],
)
def test_corrupt_or_missing_meta_is_input_error(tmp_path, params, damage, message):
    path = save_checkpoint(tmp_path / "ckpt", params, ModelConfig(n_filters=2, n_classes=3))
    damage(path)
    with pytest.raises(InputError, match=message) as e:
        load_checkpoint(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_missing_directory_and_missing_state(tmp_path, params):
    with pytest.raises(InputError, match="does not exist"):
        load_checkpoint(tmp_path / "nothing")
    path = save_checkpoint(tmp_path / "ckpt", params, ModelConfig(n_filters=2, n_classes=3))
    for f in sorted((path / checkpoint.STATE_DIR).rglob("*"), reverse=True):
        f.unlink() if f.is_file() else f.rmdir()
    with pytest.raises(InputError, match="does not match the sha256 recorded in cerebrum.json"):
        load_checkpoint(path)
    meta = json.loads((path / checkpoint.META_FILE).read_text())
    del meta[checkpoint.DIGEST_KEY]  # as a (version 1) checkpoint from before the digest: Orbax's own error
    meta["version"] = 1
    (path / checkpoint.META_FILE).write_text(json.dumps(meta))
    with pytest.raises(InputError, match="cannot restore Orbax state"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    "kwargs,error",
    [
        ({"classes": ["a", "b"]}, ValueError),  # 2 names for 3 classes
        ({"normalization": "voxelwise"}, ValueError),  # no volumes
        ({"normalization": "minmax"}, ValueError),
        ({"norm_volumes": {"mean": np.zeros(2)}}, KeyError),  # no "std"
    ],
)
def test_failed_save_leaves_nothing(tmp_path, params, kwargs, error):
    with pytest.raises(error):
        save_checkpoint(tmp_path / "ckpt", params, ModelConfig(n_filters=2, n_classes=3), **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_failed_save_during_write_leaves_nothing(tmp_path, params):
    """A leaf Orbax cannot store fails mid-save: no final directory and no temporary one remain."""
    bad = dict(params, main_output={"kernel": object(), "bias": params["main_output"]["bias"]})
    with pytest.raises(Exception):  # noqa: B017 - whatever Orbax raises, nothing may be left behind
        save_checkpoint(tmp_path / "ckpt", bad, ModelConfig(n_filters=2, n_classes=3))
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_directory_gets_umask_permissions(tmp_path, params):
    """Not mkdtemp's 0700: the directory mkdir would make under umask 022 (0755), and 0644 files."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        path = save_checkpoint(tmp_path / "ckpt", params, ModelConfig(n_filters=2, n_classes=3))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o755
    assert stat.S_IMODE((path / checkpoint.META_FILE).stat().st_mode) == 0o644


def test_overwrite_replaces_only_checkpoint_directories(tmp_path, params):
    config = ModelConfig(n_filters=2, n_classes=3)
    (tmp_path / "file").write_text("keep")
    with pytest.raises(InputError, match="is a file, not a checkpoint directory"):
        save_checkpoint(tmp_path / "file", params, config, overwrite=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep")
    with pytest.raises(InputError, match="not a checkpoint; not replaced"):
        save_checkpoint(tmp_path / "other", params, config, overwrite=True)
    assert (tmp_path / "file").read_text() == (tmp_path / "other" / "notes.txt").read_text() == "keep"
    (tmp_path / "empty").mkdir()
    save_checkpoint(tmp_path / "empty", params, config, overwrite=True)  # an empty directory is fine
    assert load_checkpoint(tmp_path / "empty").config == config
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "file", "other"]


def test_load_refuses_a_file_and_a_config_that_does_not_fit(tmp_path, params):
    (tmp_path / "model.h5").write_bytes(b"x")
    with pytest.raises(InputError, match="is a file, not a checkpoint directory"):
        load_checkpoint(tmp_path / "model.h5")
    path = save_checkpoint(tmp_path / "ckpt", params, ModelConfig(n_filters=2, n_classes=3))
    meta = json.loads((path / checkpoint.META_FILE).read_text())
    meta["model"]["n_filters"] = 4
    (path / checkpoint.META_FILE).write_text(json.dumps(meta))
    with pytest.raises(InputError, match=r"enc_lvl1_block1_conv/kernel has shape \(3, 3, 3, 1, 2\)"):
        load_checkpoint(path)
