"""A fine-tuning run's log (log.txt; log.process-I.txt for the other processes of a distributed run) and
what a stopped run leaves behind, in words."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tqdm import tqdm

from cerebrum_jax.errors import InputError
from cerebrum_jax.experiment.rundir import RunDir
from cerebrum_jax.model.checkpoint import read_meta
from cerebrum_jax.parallel import distributed


class RunLog:
    """Time-stamped log lines to the console (through tqdm while a progress bar may be shown) and to
    RUN/log.txt (process I > 0 of a distributed run: log.process-I.txt only) once ``attach`` has named
    the run directory; lines logged before that are kept and written then, so that checks can log before
    anything exists on disk."""

    def __init__(self, progress: bool = True):
        self.progress, self.path, self.pending = progress, None, []

    def __call__(self, msg: str, console: bool = True) -> None:
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        if console and distributed.is_main():  # the other processes of a distributed run: their log only
            (tqdm.write if self.progress else print)(line)
        if self.path is None:
            self.pending.append(line)
        else:
            with open(self.path, "a") as f:
                f.write(line + "\n")

    def attach(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / distributed.log_name()
        with open(self.path, "a") as f:
            f.write("".join(line + "\n" for line in self.pending))
        self.pending = []


def checkpoints_left(run: RunDir, initial_weights: str) -> str:
    """What a stopped run leaves to go on from, in words: checkpoints/best and/or checkpoints/last (with
    their epochs), or that none was written and the initial weights are unchanged."""
    parts = []
    if run.has_best():
        try:
            record = read_meta(run.best).get("best_epoch") or {}
        except (InputError, OSError, ValueError):
            record = {}
        when = f" ({record['phase']} epoch {record['epoch']})" if "epoch" in record else ""
        parts.append(f"{run.best}{when}")
    if run.has_last():
        try:
            history = json.loads(run.loop_json.read_text()).get("history") or []
        except (OSError, ValueError):
            history = []
        when = f" (after {history[-1]['phase']} epoch {history[-1]['epoch']})" if history else ""
        parts.append(f"{run.last}{when}")
    if parts:
        return "the last good checkpoints, untouched: " + " and ".join(parts)
    where = "(training from scratch)" if initial_weights == "none" else f"at {initial_weights}"
    return f"no checkpoint was written yet; the initial weights are unchanged {where}"
