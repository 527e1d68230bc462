"""Orbax checkpoints of CEREBRUM-7T parameters with the model config beside them.

Layout of a checkpoint directory::

    CKPT/cerebrum.json   model config, class names, input normalisation kind, provenance
    CKPT/state/          Orbax StandardCheckpointer tree {"params": ..., ["normalization": {"mean", "std"}]}

cerebrum.json records ``state_sha256`` (``state_digest``: every file of state/ in a stable order), checked
on load, so a flipped byte is refused instead of loading as NaN weights; checkpoints written before the
digest existed load without it. Non-finite parameters are refused on load as well.

Directories are written under a temporary name and renamed at the end, so a failed write
leaves nothing half-written under the final name. In a multi-process run each process reads and writes
these checkpoints on its own (process 0 writes them; ``distributed.local_checkpointer_options``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from cerebrum_jax.choices import NORMALIZATIONS
from cerebrum_jax.distributed import local_checkpointer_options
from cerebrum_jax.errors import InputError
from cerebrum_jax.fsafe import (
    check_space,
    deferred_interrupt,
    is_no_space,
    no_space,
    remove_tree,
    replace_dir,
    temp_dir,
)
from cerebrum_jax.model import DIVISOR, ModelConfig

FORMAT = "cerebrum-jax-checkpoint"
META_FILE = "cerebrum.json"
STATE_DIR = "state"
DIGEST_KEY = "state_sha256"


class Checkpoint(NamedTuple):
    """A loaded checkpoint.

    params: {layer_name: {"kernel", "bias"}} float32 arrays (Keras layouts, see model.LAYERS).
    config: the ModelConfig the params belong to.
    classes: class names, index = output channel.
    normalization: "voxelwise" (mean/std volumes in ``norm_volumes``), "zscore" (per volume) or "none".
    norm_volumes: {"mean": (D, H, W), "std": (D, H, W)} float32, or None.
    meta: everything else of cerebrum.json (provenance, training details).
    """

    params: dict
    config: ModelConfig
    classes: list[str]
    normalization: str
    norm_volumes: dict | None
    meta: dict


def config_to_dict(config: ModelConfig) -> dict:
    return dataclasses.asdict(config)


def config_from_dict(d: dict) -> ModelConfig:
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in d.items() if k in known})


def save_checkpoint(
    path: str | os.PathLike,
    params: dict,
    config: ModelConfig,
    *,
    classes: list[str] | None = None,
    normalization: str = "zscore",
    norm_volumes: dict | None = None,
    meta: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``params`` (and optional voxelwise normalisation volumes) as an Orbax checkpoint at ``path``."""
    path = Path(path).absolute()
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, not {normalization!r}")
    if normalization == "voxelwise" and norm_volumes is None:
        raise ValueError("voxelwise normalization needs norm_volumes={'mean', 'std'}")
    if path.exists() and not overwrite:
        raise InputError("already exists; choose another output directory or remove it", path)
    if path.exists() and not path.is_dir():
        raise InputError("is a file, not a checkpoint directory; not replaced", path)
    if path.is_dir() and any(path.iterdir()) and not (path / META_FILE).is_file():
        raise InputError(
            f"is a non-empty directory without {META_FILE}, not a checkpoint; not replaced", path
        )
    classes = list(classes) if classes else [f"class_{i}" for i in range(config.n_classes)]
    if len(classes) != config.n_classes:
        raise ValueError(f"{len(classes)} class names for {config.n_classes} classes")
    tree: dict[str, Any] = {"params": jax.tree_util.tree_map(np.asarray, params)}
    if norm_volumes is not None:
        tree["normalization"] = {k: np.asarray(norm_volumes[k], np.float32) for k in ("mean", "std")}
    info = {
        "format": FORMAT,
        "version": 1,
        "model": config_to_dict(config),
        "classes": classes,
        "normalization": normalization,
        **(meta or {}),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    check_space(path.parent, tree_bytes(tree), f"checkpoint {path.name}")
    tmp = temp_dir(path)
    try:
        with deferred_interrupt(), quiet_orbax():  # Ctrl-C, SIGTERM: once the checkpoint is complete
            with ocp.StandardCheckpointer(**local_checkpointer_options()) as ckptr:
                ckptr.save(tmp / STATE_DIR, tree)
                ckptr.wait_until_finished()
            info[DIGEST_KEY] = state_digest(tmp / STATE_DIR)
            (tmp / META_FILE).write_text(json.dumps(info, indent=2, default=str) + "\n")
            replace_dir(tmp, path)
    except BaseException as e:
        remove_tree(tmp)  # Orbax's writer threads may still be filling it
        if isinstance(e, Exception) and is_no_space(e):  # Orbax's RESOURCE_EXHAUSTED traceback otherwise
            raise no_space(path.parent, f"checkpoint {path.name}") from None
        raise
    return path


def tree_bytes(tree) -> int:
    """Bytes of the arrays of ``tree`` (what an Orbax save writes, before compression)."""
    return sum(int(getattr(leaf, "nbytes", 0)) for leaf in jax.tree_util.tree_leaves(tree))


class _DropClosedLoop:
    """A sys.unraisablehook without the "Event loop is closed" of Orbax's callbacks that arrive after a
    failed save closed its event loop (a traceback each, after the one-line message); others go to the hook
    it replaced."""

    def __init__(self, previous):
        self.previous = previous

    def __call__(self, unraisable) -> None:
        exc = unraisable.exc_value
        if not (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"):
            self.previous(unraisable)


@contextlib.contextmanager
def quiet_orbax():
    """An Orbax save or restore without absl's ERROR log lines of its writer threads (a failure raises in
    this thread, and the command line says it in one line) and without the late "Event loop is closed"
    tracebacks of a failed save (the hook stays: they come after the block)."""
    if not isinstance(sys.unraisablehook, _DropClosedLoop):
        sys.unraisablehook = _DropClosedLoop(sys.unraisablehook)
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def read_meta(path: str | os.PathLike) -> dict:
    """The cerebrum.json of a checkpoint directory; InputError if it is not one."""
    path = Path(path)
    if path.is_file():
        raise InputError("is a file, not a checkpoint directory", path)
    if not path.is_dir():
        raise InputError("checkpoint directory does not exist", path)
    meta_file = path / META_FILE
    try:
        info = json.loads(meta_file.read_text())
    except FileNotFoundError:
        raise InputError(f"not a cerebrum-jax checkpoint (no {META_FILE})", path) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"corrupt {META_FILE} ({e})", path) from None
    if info.get("format") != FORMAT:
        raise InputError(f"{META_FILE} is not a {FORMAT} description", path)
    return info


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint written by ``save_checkpoint``; params come back as numpy float32 arrays."""
    path = Path(path).absolute()
    info = read_meta(path)
    check_digest(path, info.pop(DIGEST_KEY, None))
    try:
        with deferred_interrupt(), ocp.StandardCheckpointer(**local_checkpointer_options()) as ckptr:
            tree = ckptr.restore(path / STATE_DIR)
    except Exception as e:
        raise InputError(f"cannot restore Orbax state ({type(e).__name__}: {str(e)[:200]})", path) from None
    tree = jax.tree_util.tree_map(lambda a: np.asarray(a), tree)
    config = config_from_dict(info.pop("model"))
    classes = info.pop("classes")
    normalization = info.pop("normalization", "zscore")
    for k in ("format", "version"):
        info.pop(k, None)
    ckpt = Checkpoint(tree["params"], config, classes, normalization, tree.get("normalization"), info)
    check_checkpoint(ckpt, path)
    return ckpt


def state_digest(state_dir: str | os.PathLike) -> str:
    """sha256 (hex) over every file under ``state_dir``: relative path, size and bytes, in sorted order."""
    state_dir = Path(state_dir)
    h = hashlib.sha256()
    for f in sorted(p for p in state_dir.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(state_dir).as_posix()}\0{f.stat().st_size}\0".encode())
        with open(f, "rb") as src:
            for block in iter(lambda: src.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def check_digest(path: Path, expected: str | None) -> None:
    """InputError naming ``path`` when state/ no longer has the digest recorded at save (None: not recorded,
    a checkpoint from before digests; nothing to check)."""
    if expected is None:
        return
    if not (path / STATE_DIR).is_dir():
        raise InputError(f"has no {STATE_DIR}/ directory", path)
    if state_digest(path / STATE_DIR) != expected:
        raise InputError(
            f"{STATE_DIR}/ does not match the sha256 recorded in {META_FILE} (a corrupt or modified file): "
            "not loaded; copy the checkpoint again or use another",
            path,
        )


def check_checkpoint(ckpt: Checkpoint, path) -> None:
    """InputError naming ``path`` unless params, class names and normalisation volumes fit the config."""
    expected = ckpt.config.param_shapes()
    params = ckpt.params if isinstance(ckpt.params, dict) else {}
    missing = [name for name in expected if not isinstance(params.get(name), dict)]
    if missing:
        raise InputError(f"parameters of layer(s) {', '.join(missing)} are missing", path)
    for name, shapes in expected.items():
        for part, shape in shapes.items():
            got = tuple(np.shape(params[name].get(part)))
            if got != shape:
                raise InputError(f"{name}/{part} has shape {got}, the config needs {shape}", path)
    for name in expected:
        for part in ("kernel", "bias"):
            bad = int(np.size(params[name][part]) - np.count_nonzero(np.isfinite(params[name][part])))
            if bad:
                raise InputError(f"{name}/{part} holds {bad} NaN or infinite values: not loaded", path)
    if len(ckpt.classes) != ckpt.config.n_classes:
        raise InputError(f"{len(ckpt.classes)} class names for {ckpt.config.n_classes} classes", path)
    if ckpt.normalization not in NORMALIZATIONS:
        raise InputError(f"unknown normalization {ckpt.normalization!r}", path)
    if ckpt.normalization == "voxelwise" and ckpt.norm_volumes is None:
        raise InputError("normalization is voxelwise but there are no mean/std volumes", path)
    if ckpt.norm_volumes is not None:
        shapes = {k: tuple(np.shape(ckpt.norm_volumes.get(k))) for k in ("mean", "std")}
        shape = shapes["mean"]
        if shapes["std"] != shape or len(shape) != 3 or any(s == 0 or s % DIVISOR for s in shape):
            raise InputError(
                f"mean/std volumes of shapes {shapes['mean']} / {shapes['std']}: both must be one 3-D shape "
                f"of positive multiples of {DIVISOR}",
                path,
            )
        if not all(np.isfinite(ckpt.norm_volumes[k]).all() for k in ("mean", "std")):
            raise InputError("mean/std volumes hold NaN or infinite values: not loaded", path)


DEFAULT_WEIGHTS = ("weights/glasgow", "weights/demo")  # looked for in the current directory, then the repo


def locate_weights(name: str) -> Path | None:
    """The directory ``name`` (one of ``DEFAULT_WEIGHTS``) in the current directory, else in the
    repository; None where neither has it."""
    for base in (Path.cwd(), Path(__file__).resolve().parents[1]):
        if (base / name).is_dir():
            return base / name
    return None


def find_weights(weights: str | os.PathLike | None, log=None) -> Path:
    """The checkpoint directory to start from: ``weights``, else the first of ``DEFAULT_WEIGHTS`` found
    (weights/glasgow, then weights/demo; each in the current directory, then the repository), saying so to
    ``log`` when it falls back to weights/demo. InputError when none exists. ``segment`` and
    ``finetune`` both look the default up here."""
    if weights is not None:
        return Path(weights)
    for name in DEFAULT_WEIGHTS:
        found = locate_weights(name)
        if found is not None:
            if name != DEFAULT_WEIGHTS[0] and log is not None:
                log(f"no Glasgow weights ({DEFAULT_WEIGHTS[0]} missing): starting from {found}")
            return found
    raise InputError(
        f"no checkpoint found: neither {' nor '.join(DEFAULT_WEIGHTS)} exists (run 'make weights' or pass "
        "--weights)",
        "--weights",
    )
