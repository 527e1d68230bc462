"""What the failure tests share: a tiny dataset, checkpoint, image and Keras .h5 (``files``, one per test
module), the fold command line over them, and the checks of "one line, exit status 2" and "nothing
written". Imported by tests/test_failures*.py (their fixtures come from here)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from cerebrum_jax.cli import build_parser
from cerebrum_jax.cli.finetune import resolve
from cerebrum_jax.model import checkpoint
from cerebrum_jax.model import keras as convert
from cerebrum_jax.model import network as model

CONFIG = model.ModelConfig(n_filters=2, n_classes=3)
SHAPE = (16, 16, 16)
REPO_ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}  # a real process imports this checkout


def _subject(root: Path, sid: str, seed: int) -> None:
    """A Schneider-layout subject: a ball of labels 1..3 with intensities per label plus noise."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij")
    r = np.sqrt((zz - 8) ** 2 + (yy - 8) ** 2 + (xx - 8) ** 2)
    labels = np.select([r < 2.5, r < 4.5, r < 6], [1, 2, 3], 0).astype(np.uint8)
    image = (np.array([0, 300, 200, 100], np.float32)[labels] + rng.normal(0, 10, SHAPE)).astype(np.float32)
    base = root / "derivatives" / sid
    for sub, name, data in (("unbiased", "uni_unbiased", image), ("labeled", "labels_v01", labels)):
        (base / sub).mkdir(parents=True)
        nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0])), base / sub / f"{sid}_{name}.nii.gz")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny dataset, a checkpoint, a NIfTI image and a Keras .h5 of the checkpoint's parameters."""
    root = tmp_path_factory.mktemp("failures")
    for i in range(3):
        _subject(root / "data", f"sub-{i + 1:03d}", i)
    rng = np.random.default_rng(0)  # random weights, no jit (init_params compiles for a minute on a busy CPU)
    params = {
        name: {part: rng.normal(0, 0.2, shape).astype(np.float32) for part, shape in shapes.items()}
        for name, shapes in CONFIG.param_shapes().items()
    }
    ck = checkpoint.save_checkpoint(root / "ck", params, CONFIG)
    img = root / "in.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((8, 8, 8), np.float32), np.eye(4)), img)
    h5 = convert.write_keras_h5(root / "good.h5", params, CONFIG)
    lab = root / "data" / "derivatives" / "sub-001" / "labeled" / "sub-001_labels_v01.nii.gz"
    return {"root": root, "data": root / "data", "ck": ck, "img": img, "h5": h5, "params": params, "lab": lab}


def finetune_args(files, out, *extra) -> list[str]:
    return [
        "finetune", "--config", "demo", "--data", str(files["data"]), "--weights", str(files["ck"]),
        "--out", str(out), "--fold", "1", "--grid", "16,16,16", "--epochs", "1", "--augment-views", "1",
        "--no-progress", *extra,
    ]  # fmt: skip


def one_error_line(capsys, code: int, message: str) -> str:
    """Assert exit status 2 and exactly one stderr line holding ``message``, no traceback; return it."""
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and message in err, err
    return err


def tree(path: Path) -> dict:
    """{relative path: bytes or 'dir'} of everything under ``path`` (links not followed)."""
    if not path.exists():
        return {}
    return {
        str(p.relative_to(path)): "dir" if p.is_dir() and not p.is_symlink() else p.read_bytes()
        for p in sorted(path.rglob("*"))
    }


def stored_run(files, out: Path, *extra, **changes) -> Path:
    """A fold run directory holding the config.json that ``finetune_args(*extra)`` would write (with
    ``changes`` to its config), as an earlier run left it."""
    args = build_parser().parse_args(finetune_args(files, out, *extra))
    cfg, fold, _ = resolve(args)
    run = out / f"fold-{fold}"
    (run / "checkpoints" / "last").mkdir(parents=True)
    stored = json.loads(json.dumps(cfg.to_dict(), default=str))
    (run / "config.json").write_text(json.dumps({"config": {**stored, **changes}}))
    (run / "log.txt").write_text("an earlier run\n")
    return run
