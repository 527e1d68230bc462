"""Guards of a fine-tuning fold's run directory: one run at a time, and a ``--resume`` that continues the
same run or refuses.

``guarded`` wraps ``finetune.train_and_evaluate``: it takes the directory's lock (``fsafe.DirLock``) for
the whole run, and on ``--resume`` checks, before anything is loaded or written, that

- no file of the run is a symbolic link (a log.txt linked elsewhere would be appended through),
- config.json and checkpoints/last/loop.json are readable and well formed, and checkpoints/last/state
  has the sha256 that loop.json records (``runhooks.save_last``; every loop.json it writes records one,
  so a loop.json without it is corrupt, not old: a digest that may be deleted would protect nothing),
- the config equals the run's config.json but for the performance-only keys ``PERFORMANCE_KEYS``
  (how to compute, not what: the device mesh, rematerialisation, the convolution precision),

and removes the temporary leftovers of a save that was killed before its rename (checkpoints/.last.*,
.best.*). Each refusal is an InputError naming the file and the problem.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path

from cerebrum_jax import fsafe
from cerebrum_jax.errors import InputError
from cerebrum_jax.experiment.config import RuntimeConfig
from cerebrum_jax.experiment.rundir import RunDir
from cerebrum_jax.model.checkpoint import state_digest

LOCK_NAME = fsafe.LOCK_NAME  # for the callers' emptiness checks

PERFORMANCE_KEYS = tuple(f.name for f in dataclasses.fields(RuntimeConfig))  # how to compute, not what
LOOP_KEYS = {"phase": int, "next_epoch": int, "best": (int, float), "history": list}
NO_RESUME = "the run cannot be resumed"
CONTROLLER_KEYS = ("lr", "best", "wait", "plateau_best", "plateau_wait", "stop")


def guarded(train_and_evaluate):
    """Decorate ``train_and_evaluate(cfg, workdir, *, resume=False, log=None, ...)`` with the lock and the
    resume checks."""

    @functools.wraps(train_and_evaluate)
    def wrapper(cfg, workdir, *args, resume: bool = False, **kw):
        lock = fsafe.dir_lock(workdir, f"finetune fold {cfg.fold}")
        try:
            if resume:
                check_resume(Path(workdir), cfg, log=kw.get("log") or print)
            return train_and_evaluate(cfg, workdir, *args, resume=resume, **kw)
        finally:
            lock.release()

    return wrapper


def check_resume(run_dir: Path, cfg, log=print) -> None:
    """Every check of a run directory about to be resumed with ``cfg`` (see the module docstring)."""
    run = RunDir(Path(run_dir))
    fsafe.check_own_files(run_dir)
    if run.config_json.exists():
        check_same_config(run.config_json, cfg)
    if run.loop_json.exists():
        # every loop.json save_last writes holds the digest: one without it was edited (a downgrade), and a
        # digest that may be deleted would protect nothing
        digest = read_loop(run.loop_json).get("state_sha256")
        if not isinstance(digest, str):
            raise InputError(f"corrupt loop.json: no 'state_sha256' of state/; {NO_RESUME}", run.loop_json)
        if not run.last_state.is_dir() or state_digest(run.last_state) != digest:
            raise InputError(
                f"state/ is missing or does not match the sha256 in loop.json (corrupt); {NO_RESUME}",
                run.last,
            )
    fsafe.remove_leftovers(run.checkpoints, log=log)
    fsafe.remove_leftovers(run_dir, patterns=(".*.tmp*",), log=log)


def read_json(path: Path, what: str):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:  # ValueError: JSONDecodeError and UnicodeDecodeError
        reason = " ".join(str(e).split())[:120]
        raise InputError(f"corrupt {what} ({type(e).__name__}: {reason}); {NO_RESUME}", path) from None


def config_differences(stored: dict, current: dict) -> list[str]:
    """The keys whose values differ between two config dicts (JSON forms), performance-only keys aside."""
    keys = sorted(set(stored) | set(current))
    absent = "<absent>"
    return [k for k in keys if k not in PERFORMANCE_KEYS and stored.get(k, absent) != current.get(k, absent)]


def check_same_config(config_json: Path, cfg) -> None:
    """InputError naming ``config_json`` and the differing keys unless ``cfg`` is the run's config."""
    info = read_json(config_json, "config.json")
    stored = info.get("config") if isinstance(info, dict) else None
    if not isinstance(stored, dict):
        raise InputError(f"has no 'config' object; {NO_RESUME}", config_json)
    current = json.loads(json.dumps(cfg.to_dict(), default=str))
    diff = config_differences(stored, current)
    if diff:
        shown = ", ".join(f"{k} ({_short(stored.get(k))} -> {_short(current.get(k))})" for k in diff[:6])
        more = f" and {len(diff) - 6} more" if len(diff) > 6 else ""
        raise InputError(
            f"--resume with a config that differs from the run's in {shown}{more}; resume with the run's "
            f"config (only {', '.join(PERFORMANCE_KEYS)} may change) or start a new run in another --out",
            config_json,
        )


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def read_loop(path: Path) -> dict:
    """checkpoints/last/loop.json (``runhooks.save_last``) checked field by field; InputError naming it."""
    loop = read_json(path, "loop.json")
    if not isinstance(loop, dict):
        raise InputError(f"corrupt loop.json (not an object); {NO_RESUME}", path)
    for key, kind in LOOP_KEYS.items():
        value = loop.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise InputError(f"corrupt loop.json: {key!r} is {value!r}; {NO_RESUME}", path)
    if loop["phase"] < 0 or loop["next_epoch"] < 0 or math.isnan(loop["best"]):
        raise InputError(f"corrupt loop.json: negative phase/epoch or NaN best; {NO_RESUME}", path)
    controller = loop.get("controller")
    if not (controller is None or isinstance(controller, dict) and set(controller) == set(CONTROLLER_KEYS)):
        raise InputError(f"corrupt loop.json: controller is {_short(controller)}; {NO_RESUME}", path)
    if not all(isinstance(h, dict) and "phase" in h and "epoch" in h for h in loop["history"]):
        raise InputError(f"corrupt loop.json: history entries lack phase/epoch; {NO_RESUME}", path)
    return loop


def check_run_dir(run_dir: Path, resume: bool) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise InputError("is a file, not a run directory", run_dir)
    if run_dir.exists() and any(p.name != LOCK_NAME for p in run_dir.iterdir()) and not resume:
        raise InputError("run directory is not empty; use --resume to continue it, or another --out", run_dir)
