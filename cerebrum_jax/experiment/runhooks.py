"""The ``loop.fit`` hooks that keep a fine-tuning run directory (``rundir.RunDir``): metrics.jsonl after
every epoch, checkpoints/last (resumable state) after every epoch, checkpoints/best on every new best
val loss, and resuming from the two.

Orbax's CheckpointManager is not used for last and best: it keeps numbered step directories and picks
the best among them, whereas checkpoints/best must stay one fixed, complete model directory (classes,
normalisation, preprocessing, sha256 checks: ``checkpoint``) for ``segment --weights RUN/checkpoints/best``,
and ``runguard`` checks checkpoints/last/loop.json and its state sha256 before a resume. Both are written
beside and renamed into place (atomic).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from cerebrum_jax import fsafe
from cerebrum_jax.errors import InputError
from cerebrum_jax.experiment.rundir import LOOP_JSON, STATE, RunDir
from cerebrum_jax.fsafe import deferred_interrupt
from cerebrum_jax.model.checkpoint import load_checkpoint, state_digest, write_state_dir
from cerebrum_jax.parallel import distributed
from cerebrum_jax.train.loop import Controller, EpochEnd, Hooks, Resume

# ----------------------------------------------------------------------------------------------------------
# Resumable state (checkpoints/last)


def save_last(path: Path, state: dict, loop: dict) -> None:
    """Orbax state {"params", "opt_state", "step"} + loop.json, written beside and renamed into place.

    In a multi-process run every process saves (Orbax multi-process) and process 0 writes loop.json."""
    if distributed.process_count() > 1:

        def text(state_dir: Path) -> str:  # the digest of the state the processes wrote, as on one process
            return json.dumps({**loop, "state_sha256": state_digest(state_dir)}, indent=1) + "\n"

        return distributed.save_state(path, state, {LOOP_JSON: text})
    # Orbax refuses relative checkpoint paths; the digest is checked on --resume (runguard)
    write_state_dir(Path(path).absolute(), state, LOOP_JSON, loop, indent=1)


def load_last(path: Path, like_state: dict) -> dict:
    """The train state saved by ``save_last`` at ``path``, shaped like ``like_state``; InputError naming
    ``path`` when it is corrupt or foreign."""
    if distributed.process_count() > 1:
        return distributed.restore_state(path, like_state)
    try:
        with deferred_interrupt(), ocp.StandardCheckpointer() as ckptr:
            return ckptr.restore(Path(path).absolute() / STATE, target=like_state)
    except (ValueError, OSError, KeyError, RuntimeError) as e:  # corrupt or foreign: no Orbax traceback
        reason = " ".join(str(e).split())[:150]
        raise InputError(f"cannot restore ({type(e).__name__}: {reason}); cannot resume", path) from None


# ----------------------------------------------------------------------------------------------------------
# The hooks


class RunDirHooks(Hooks):
    """``loop.fit`` hooks that keep a run directory: after every epoch metrics.jsonl (process 0) and
    checkpoints/last (every process of a distributed run); on every new best val loss checkpoints/best,
    written by ``save_best(path, params, record)`` (None: not written, e.g. processes > 0); on
    ``resume``, the position, history and state of checkpoints/last and the params of checkpoints/best
    (both written here, so the pair is consistent)."""

    def __init__(self, run: RunDir, save_best: Callable | None = None, *, resume: bool = False, log=print):
        self.run, self.save_best, self.resuming, self.log = run, save_best, resume, log

    def resume(self, params, phases) -> Resume | None:
        if not (self.resuming and self.run.has_last()):
            return None
        loop = json.loads(self.run.loop_json.read_text())
        controller = Controller(**loop["controller"]) if loop["controller"] else None
        best_params = load_checkpoint(self.run.best).params if loop["best"] < np.inf else params
        phase = phases[min(loop["phase"], len(phases) - 1)].name
        self.log(f"resuming at phase {phase}, epoch {loop['next_epoch'] + 1}")
        return Resume(
            phase=loop["phase"],
            next_epoch=loop["next_epoch"],
            history=loop["history"],
            controller=controller,
            best_loss=loop["best"],
            best_params=jax.tree_util.tree_map(jnp.asarray, best_params),
            restore=lambda like_state: load_last(self.run.last, like_state),
        )

    def improved(self, params, record):
        if self.save_best is not None:
            self.save_best(self.run.best, params, record)

    def epoch_end(self, end: EpochEnd):
        if distributed.is_main():
            lines = "".join(json.dumps(h) + "\n" for h in end.history)
            fsafe.write_text(self.run.metrics_jsonl, lines)
        save_last(self.run.last, end.state, end.position())
