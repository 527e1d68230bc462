"""Orbax checkpoints of CEREBRUM-7T parameters with the model config beside them.

Layout of a checkpoint directory::

    CKPT/cerebrum.json   model config, class names, input normalisation kind, provenance
    CKPT/state/          Orbax StandardCheckpointer tree {"params": ..., ["normalization": {"mean", "std"}]}

cerebrum.json records ``state_sha256`` (``state_digest``: the path, size and bytes of every file of state/ in
a stable order), checked on every load, so a flipped byte, a truncated, missing or extra file is refused
instead of loading as NaN weights. Checkpoints are written as version 2, which must carry the digest (a
version-2 record without it is corrupt, not "old"); version-1 records from before the digest load with one
warning line ("not verified") and are refused where a copy would be made of them (``require_digest``).
The digest detects corruption and accidental change; it is no signature: whoever can write the directory
can rewrite the digest as well. ``check_meta`` validates every field of cerebrum.json on reading it.
Non-finite parameters are refused on load as well.

Directories are written under a temporary name and renamed at the end, so a failed write
leaves nothing half-written under the final name. In a multi-process run each process reads and writes
these checkpoints on its own (process 0 writes them; ``local_checkpointer_options``).
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

from cerebrum_jax.choices import CROPS, MASKS, NORMALIZATIONS
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
from cerebrum_jax.model.spec import ACTIVATION_NAMES, DIVISOR, ModelConfig
from cerebrum_jax.shipped import shipped_dir

FORMAT = "cerebrum-jax-checkpoint"
META_FILE = "cerebrum.json"
STATE_DIR = "state"
DIGEST_KEY = "state_sha256"
VERSION = 2  # 2: state_sha256 is required; 1: written before the digest existed (loads unverified)


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


def local_checkpointer_options() -> dict:
    """Orbax options for a checkpoint this process reads or writes on its own: in a distributed run
    (``jax.distributed`` initialized), the other processes take no part (and are not waited for)."""
    if not jax.distributed.is_initialized():
        return {}
    me = jax.process_index()
    return {
        "multiprocessing_options": ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    }


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
        "version": VERSION,
        "model": config_to_dict(config),
        "classes": classes,
        "normalization": normalization,
        **(meta or {}),
    }
    return write_state_dir(path, tree, META_FILE, info, **local_checkpointer_options())


def write_state_dir(path: Path, tree, meta_name: str, meta: dict, *, indent: int = 2, **options) -> Path:
    """Write ``path``/state (the Orbax tree ``tree``, ``ocp.StandardCheckpointer(**options)``) and
    ``path``/``meta_name`` (``meta`` plus the state's digest, ``DIGEST_KEY``) under a temporary name beside
    ``path`` and rename it into place (an existing ``path`` replaced only then). Ctrl-C and SIGTERM wait for
    the end; a full disk is one InputError naming the directory (refused before Orbax starts where the free
    space is short), the temporary directory removed. The one writer of checkpoints and of a run's
    checkpoints/last."""
    path.parent.mkdir(parents=True, exist_ok=True)
    check_space(path.parent, tree_bytes(tree), f"checkpoint {path.name}")
    tmp = temp_dir(path)
    try:
        with deferred_interrupt(), quiet_orbax():  # Ctrl-C, SIGTERM: once the checkpoint is complete
            with ocp.StandardCheckpointer(**options) as ckptr:
                ckptr.save(tmp / STATE_DIR, tree)
                ckptr.wait_until_finished()
            text = json.dumps({**meta, DIGEST_KEY: state_digest(tmp / STATE_DIR)}, indent=indent, default=str)
            (tmp / meta_name).write_text(text + "\n")
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
    """A sys.unraisablehook without the "Event loop is closed" reports of Orbax: when one write or read of
    a save or restore fails, Orbax closes its asyncio loop while tensorstore's other operations are still
    in flight, and each of their callbacks then reports the RuntimeError through ``sys.unraisablehook`` (a
    traceback each, after the one-line message, until exit). Others go to the hook it replaced."""

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
    tracebacks of a failed save or restore (``_DropClosedLoop``; the hook stays: they come after the
    block)."""
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
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise InputError(f"{META_FILE} is not a {FORMAT} description", path)
    check_meta(info, path)
    return info


def load_checkpoint(path: str | os.PathLike, *, require_digest: bool = False, warn=None) -> Checkpoint:
    """Read a checkpoint written by ``save_checkpoint``; params come back as numpy float32 arrays.

    A version-1 checkpoint without ``state_sha256`` is refused with ``require_digest`` (a conversion
    would hand on unverified weights as if they were sound), else loaded after one line to ``warn``
    (default: stderr)."""
    path = Path(path).absolute()
    info = read_meta(path)
    digest = info.pop(DIGEST_KEY, None)
    if digest is None:
        why = f"no {DIGEST_KEY} in {META_FILE} (a checkpoint from before digests): {STATE_DIR}/"
        if require_digest:
            raise InputError(f"{why} cannot be verified; not converted", path)
        (warn or _stderr)(f"warning: {path}: {why} not verified")
    check_digest(path, digest)
    tree = _restore(path)
    tree = jax.tree_util.tree_map(lambda a: np.asarray(a), tree)
    if not isinstance(tree, dict) or not isinstance(tree.get("params"), dict):
        raise InputError(f"{STATE_DIR}/ holds no 'params' tree", path)
    config = config_from_dict(info.pop("model"))
    classes = info.pop("classes")
    normalization = info.pop("normalization", "zscore")
    for k in ("format", "version"):
        info.pop(k, None)
    ckpt = Checkpoint(tree["params"], config, classes, normalization, tree.get("normalization"), info)
    check_checkpoint(ckpt, path)
    return ckpt


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _restore(path: Path) -> dict:
    """The Orbax tree of ``path``/state; InputError (one line) when Orbax cannot read it."""
    try:
        with deferred_interrupt(), quiet_orbax():
            with ocp.StandardCheckpointer(**local_checkpointer_options()) as ckptr:
                return ckptr.restore(path / STATE_DIR)
    except Exception as e:
        reason = " ".join(str(e).split())[:200]
        raise InputError(f"cannot restore Orbax state ({type(e).__name__}: {reason})", path) from None


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


# ----------------------------------------------------------------------------------------------------------
# The schema of cerebrum.json: every field a reader uses, checked once when it is read


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)


def _require(ok: bool, path, field: str, want: str, got) -> None:
    if not ok:
        raise InputError(f"{META_FILE}: {field} must be {want}, got {got!r}"[:300], path)


def _one_of(choices) -> str:
    return "one of " + ", ".join(map(str, choices))


def check_meta(info: dict, path) -> None:
    """InputError naming ``path`` and the field unless ``info`` (a cerebrum.json) is a well-formed record:
    version, model config, class names, normalisation, digest, preprocessing record, train_voxel_mm."""
    _require(info.get("version") in (1, VERSION), path, "version", _one_of((1, VERSION)), info.get("version"))
    digest = info.get(DIGEST_KEY)
    if info["version"] >= 2 or digest is not None:  # a v2 record without its digest: corrupt, not old
        ok = isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)
        _require(ok, path, DIGEST_KEY, "64 hex digits (version 2 records carry it)", digest)
    model = info.get("model")
    _require(isinstance(model, dict), path, "model", "an object", model)
    _check_model(model, path)
    classes = info.get("classes")
    ok = isinstance(classes, list) and all(isinstance(c, str) and c for c in classes)
    ok = ok and len(set(classes)) == len(classes)  # one name per output channel (dseg.tsv, file names)
    _require(ok and len(classes) == model["n_classes"], path, "classes",
             f"a list of {model['n_classes']} distinct names (model.n_classes)", classes)  # fmt: skip
    normalization = info.get("normalization", "zscore")
    _require(normalization in NORMALIZATIONS, path, "normalization", _one_of(NORMALIZATIONS), normalization)
    if info.get("preprocessing") is not None:
        _check_preprocessing(info["preprocessing"], path)
    voxel = info.get("train_voxel_mm")
    if voxel is not None:
        ok = isinstance(voxel, list) and len(voxel) == 3 and all(_is_number(v) and v > 0 for v in voxel)
        _require(ok, path, "train_voxel_mm", "3 positive numbers (mm)", voxel)


def _check_model(model: dict, path) -> None:
    for key, low in (("n_filters", 1), ("n_classes", 2)):
        v = model.get(key)
        _require(_is_int(v) and v >= low, path, f"model.{key}", f"an integer >= {low}", v)
    for key in ("enc_activation", "dec_activation"):
        v = model.get(key, "relu")
        known = ACTIVATION_NAMES
        _require(isinstance(v, str) and v in known, path, f"model.{key}", _one_of(known), v)
    v = model.get("dropout_rate", 0.1)
    _require(_is_number(v) and 0 <= v < 1, path, "model.dropout_rate", "a number in [0, 1)", v)
    v = model.get("compute_dtype", "float32")
    dtypes = ("float32", "bfloat16")
    _require(isinstance(v, str) and v in dtypes, path, "model.compute_dtype", _one_of(dtypes), v)
    v = model.get("remat", False)
    _require(isinstance(v, bool), path, "model.remat", "true or false", v)


def _check_preprocessing(rec, path) -> None:
    _require(isinstance(rec, dict), path, "preprocessing", "an object", rec)
    for key, choices, default in (("mask", MASKS, "none"), ("crop", CROPS, "none"),
                                  ("normalization", NORMALIZATIONS, "zscore")):  # fmt: skip
        v = rec.get(key, default)
        _require(isinstance(v, str) and v in choices, path, f"preprocessing.{key}", _one_of(choices), v)
    v = rec.get("margin", 4)
    _require(_is_int(v) and v >= 0, path, "preprocessing.margin", "an integer >= 0", v)
    grid = rec.get("grid")
    if grid is not None:
        ok = (
            isinstance(grid, list)
            and len(grid) == 3
            and all(_is_int(g) and g > 0 and g % DIVISOR == 0 for g in grid)
        )
        _require(ok, path, "preprocessing.grid", f"3 positive multiples of {DIVISOR} or null", grid)
    v = rec.get("voxel_mm")
    if v is not None:
        _require(_is_number(v) and v > 0, path, "preprocessing.voxel_mm", "a positive number (mm) or null", v)


DEFAULT_WEIGHTS = ("weights/glasgow", "weights/demo")  # in the current directory, then shipped ones


def locate_weights(name: str) -> Path | None:
    """The directory ``name`` (one of ``DEFAULT_WEIGHTS``, "weights/...") in the current directory, else
    among the weights that ship with the package (the wheel's, or the clone's weights/); None where
    neither has it."""
    if (Path.cwd() / name).is_dir():
        return Path.cwd() / name
    shipped = shipped_dir("weights")
    found = shipped / Path(name).relative_to("weights") if shipped is not None else None
    return found if found is not None and found.is_dir() else None


def find_weights(weights: str | os.PathLike | None, log=None) -> Path:
    """The checkpoint directory to start from: ``weights``, else the first of ``DEFAULT_WEIGHTS`` found
    (weights/glasgow, then weights/demo; each in the current directory, then shipped), saying so to
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
