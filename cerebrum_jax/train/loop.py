"""The epoch loop of fine-tuning: phases of Adam with frozen layers, augmented views, validation,
reduce-on-plateau and early stopping, best parameters kept. Pure: it reads and writes no file.

What a caller wants done between steps and epochs (a progress bar, log lines, metrics.jsonl, the latest
and the best checkpoint, resuming) it passes as ``Hooks``: ``Progress`` and ``LogLines`` here,
``rundir.RunDirHooks`` for a fine-tuning run directory. ``fit`` with no hooks trains in memory and returns
the best parameters and the history.

Keys: augmentation views ``augment.view_key(seed, phase * 100000 + epoch, subject, view)``, the order of
(subject, view) pairs ``numpy.random.default_rng([seed, phase, epoch])`` (per share with several subject
shares, ``shares.Shares.epoch_batches``), dropout ``fold_in`` of the
phase key ``fold_in(key(seed), phase)`` and the step: same seed, same results, on resume too.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from cerebrum_jax import runtime
from cerebrum_jax.data import skeleton
from cerebrum_jax.errors import NonFiniteLoss
from cerebrum_jax.parallel import distributed, sharding
from cerebrum_jax.parallel.shares import Shares
from cerebrum_jax.train import losses, streamed
from cerebrum_jax.train.augment import AugmentConfig, augment_views
from cerebrum_jax.train.losses import LossConfig
from cerebrum_jax.train.schedule import LoopConfig
from cerebrum_jax.train.steps import (
    Controller,
    controller_update,
    get_learning_rate,
    init_state,
    make_eval_step,
    make_optimizer,
    make_train_step,
    set_learning_rate,
)


@dataclasses.dataclass
class Phase:
    name: str
    lr: float
    epochs: int
    frozen: dict  # pytree like params, True = not trained in this phase


class Resume(NamedTuple):
    """Where a stopped run goes on (``Hooks.resume``): the next phase index and epoch in it, the history
    so far, the phase's controller (None: that phase had finished, the next starts fresh), the best val
    loss and its params, and ``restore(like_state) -> state``: the train state saved after the last
    epoch."""

    phase: int
    next_epoch: int
    history: list
    controller: Controller | None
    best_loss: float
    best_params: dict
    restore: Callable[[dict], dict]


@dataclasses.dataclass(frozen=True)
class EpochEnd:
    """What ``Hooks.epoch_end`` gets after each epoch: the phase (index, Phase), the epoch's ``record``
    (one line of metrics.jsonl), the whole history, the train state (params, opt_state, step), the
    controller, the best val loss so far and ``done`` (the phase ends with this epoch)."""

    phase_index: int
    phase: Phase
    record: dict
    history: list
    state: dict
    controller: Controller
    best_loss: float
    done: bool

    def position(self) -> dict:
        """The loop position to resume after this epoch (checkpoints/last/loop.json without its sha256)."""
        return {
            "phase": self.phase_index + 1 if self.done else self.phase_index,
            "next_epoch": 0 if self.done else self.record["epoch"],
            "controller": None if self.done else dataclasses.asdict(self.controller),
            "best": self.best_loss,
            "history": self.history,
        }


class Hooks:
    """What ``fit`` calls; every method does nothing here, subclasses override what they need."""

    def resume(self, params, phases: Sequence[Phase]) -> Resume | None:
        """Where to go on, or None: start from ``params`` at the first phase."""
        return None

    def phase_start(self, phase: Phase, n_steps: int, first_epoch: int) -> None:
        """A phase begins (``n_steps`` steps per epoch; at ``first_epoch`` when resumed)."""

    def step_end(self, phase: Phase, epoch: int, loss: float) -> None:
        """One training step done (``epoch`` 0-based) with this finite ``loss``."""

    def improved(self, params, record: dict) -> None:
        """A new best val loss: ``params`` (a copy, not donated) after the epoch of ``record``."""

    def epoch_end(self, end: EpochEnd) -> None:
        """An epoch validated (after ``improved``, before the learning rate is cut)."""

    def phase_end(self, phase: Phase, stopped: bool, best_loss: float) -> None:
        """A phase ends: early stop or all epochs run."""

    def close(self) -> None:
        """``fit`` returns or raises (NonFiniteLoss): release what is open (a progress bar)."""


class Progress(Hooks):
    """A tqdm progress bar per phase (``enabled`` False: none)."""

    def __init__(self, enabled: bool = True):
        self.enabled, self.bar = enabled, None

    def phase_start(self, phase, n_steps, first_epoch):
        self.close()
        self.bar = tqdm(
            total=phase.epochs * n_steps,
            initial=first_epoch * n_steps,
            desc=phase.name,
            disable=not self.enabled,
            unit="step",
            dynamic_ncols=True,
        )

    def step_end(self, phase, epoch, loss):
        self.bar.set_postfix_str(f"epoch {epoch + 1}/{phase.epochs} loss {loss:.4f}")
        self.bar.update(1)

    def phase_end(self, phase, stopped, best_loss):
        self.close()

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class LogLines(Hooks):
    """One log line per epoch (losses, val Dice, learning rate, * when improved) and per phase end."""

    def __init__(self, log=print):
        self.log = log

    def epoch_end(self, end):
        r = end.record
        self.log(
            f"{r['phase']} epoch {r['epoch']}: train {r['train_loss']:.4f} val {r['val_loss']:.4f} "
            f"val dice {r['val_dice'] or float('nan'):.4f} lr {r['lr']:.2e}" + (" *" if r["improved"] else "")
        )

    def phase_end(self, phase, stopped, best_loss):
        self.log(
            f"{phase.name}: {'early stop' if stopped else 'all epochs run'}, best val loss {best_loss:.4f}"
        )


def nanmean(values) -> np.ndarray:
    """Mean over the first axis ignoring NaN (n/a Dice), NaN where all are NaN, without a warning."""
    values = np.asarray(values, np.float64)
    count = np.sum(~np.isnan(values), axis=0)
    total = np.nansum(values, axis=0)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _none_if_nan(value) -> float | None:
    value = float(value)
    return None if np.isnan(value) else value


class _Data(NamedTuple):
    """A fold's arrays on the device: the training images (N', D, H, W, 1) and labels this process holds,
    their position by subject index (``at``), the validation batches, the balanced (or unit) class
    weights, the training volumes' tubed skeletons (N', D, H, W) uint8 (None: the loss has no skeleton
    recall term)."""

    images: jax.Array
    labels: jax.Array
    at: dict
    val: list
    weights: np.ndarray
    skeletons: jax.Array | None


class _Run(NamedTuple):
    """What every epoch of one ``fit`` shares."""

    schedule: LoopConfig
    loss: LossConfig
    augment: AugmentConfig
    model_config: object
    data: _Data
    eval_step: Callable
    mesh: object
    act: object  # the activations' sharding over the mesh, or None
    hooks: Sequence[Hooks]
    n_steps: int
    shares: Shares


def _device_data(train, val, n_classes: int, mesh, part: Shares, weights, loss: LossConfig) -> _Data:
    """The training volumes this process holds on its first device (one share: all of them, since the
    shuffled order draws any into its batch rows), the validation batches, the class ``weights`` (None:
    balanced from ``train``).

    One share: on a mesh whose "data" axis is R > 1, a validation batch is its volume repeated R times
    (the same loss; Dice differs only by the 1e-7 smoothing term), each process putting only its rows
    and depth box (``distributed.put_batch``). Several shares: each volume this process validates is a
    batch of one on its own first device (``_validate``). The tubed skeletons of
    ``loss.skeleton_classes`` are computed here, once per volume (``skeleton.tubed_skeleton``)."""
    if weights is None:
        weights = losses.balanced_class_weights([y for _, y in train], n_classes)
    images = jnp.asarray(np.stack([x for x, _ in train]))[..., None]
    labels = jnp.asarray(np.stack([y for _, y in train]))
    at = {s: i for i, s in enumerate(part.train_index)}
    copies = 1 if mesh is None or part.count > 1 else mesh.shape["data"]
    mine = copies if copies == 1 else len(range(copies)[distributed.local_rows(copies, mesh)])
    tube = functools.partial(skeleton.tubed_skeleton, classes=loss.skeleton_classes)
    skeletons = jnp.asarray(np.stack([tube(y) for _, y in train])) if loss.uses_skeleton else None
    batches = []
    for x, y in val:
        batch = {
            "image": np.repeat(x[None, ..., None], mine, axis=0),
            "labels": np.repeat(y[None], mine, axis=0),
            "class_weights": weights,
        }
        if loss.uses_skeleton:
            batch["skeleton"] = np.repeat(tube(y)[None], mine, axis=0)
        batches.append(batch)
    if copies == 1:
        batches = [jax.tree_util.tree_map(jnp.asarray, v) for v in batches]
    else:
        batches = [distributed.put_batch(v, mesh, copies) for v in batches]
    return _Data(images, labels, at, batches, weights, skeletons)


def fit(
    schedule: LoopConfig,
    loss: LossConfig,
    augment: AugmentConfig,
    model_config,
    params,
    phases: Sequence[Phase],
    train: Sequence[tuple[np.ndarray, np.ndarray]],
    val: Sequence[tuple[np.ndarray, np.ndarray]],
    *,
    hooks: Sequence[Hooks] = (),
    mesh=None,
    shares: Shares | None = None,
    class_weights: np.ndarray | None = None,
):
    """Train ``params`` through ``phases`` on ``train``, validating on ``val``: each a list of (image
    (D, H, W) float32, normalised; labels (D, H, W) int class indices) pairs.

    Each phase: Adam (frozen leaves untouched), up to ``epochs`` epochs of ``schedule.augment_views``
    augmented views per training volume (or the volumes as they are), val loss after each epoch,
    reduce-on-plateau, early stopping, best params kept; the next phase starts from the best params.
    Returns (best params, history: one record per epoch). With a ``mesh`` (see ``sharding``), every step
    runs sharded: batches split (B over "data", D over "space"), state replicated. With ``shares``
    (``shares.Shares``, default one share of every subject), ``train`` and ``val`` are the subjects this
    process holds (``shares.train_index``, ``val_index``) and ``class_weights`` (C,) those of all training
    subjects. Raises NonFiniteLoss on a NaN/inf training or validation loss, before any hook sees that
    epoch.
    """
    part = shares or Shares.single(len(train), len(val))
    data = _device_data(train, val, model_config.n_classes, mesh, part, class_weights, loss)
    act = sharding.activation_sharding(mesh) if mesh is not None else None
    slabs = schedule.slab_rows if part.count == 1 else streamed.auto_slab_rows(np.shape(train[0][0]))
    options = runtime.mesh_compiler_options() if mesh is not None else None
    eval_step = jax.jit(
        make_eval_step(model_config, loss, act if part.count == 1 else None, slabs), compiler_options=options
    )
    at = None
    for hook in hooks:
        at = at or hook.resume(params, phases)
    history = list(at.history) if at else []
    best = (at.best_loss, at.best_params) if at else (float("inf"), params)
    n_steps = part.n_steps(schedule.views_per_volume, schedule.batch_size)
    run = _Run(schedule, loss, augment, model_config, data, eval_step, mesh, act, hooks, n_steps, part)
    try:
        for p_index in range(at.phase if at else 0, len(phases)):
            phase = phases[p_index]
            if phase.epochs == 0:
                continue
            resumed = at if at and at.controller is not None and p_index == at.phase else None
            state, controller, first_epoch, step = _start_phase(run, phase, best[1], resumed)
            for hook in hooks:
                hook.phase_start(phase, n_steps, first_epoch)
            stopped = False
            for epoch in range(first_epoch, phase.epochs):
                scheduled = schedule.lr_at(phase.lr, epoch, phase.epochs)
                if scheduled is not None:  # the cosine schedule: this epoch's rate
                    controller = dataclasses.replace(controller, lr=scheduled)
                    state["opt_state"] = set_learning_rate(state["opt_state"], scheduled)
                state, record, controller, best = _epoch(
                    run, step, state, controller, best, p_index, phase, epoch
                )
                history.append(record)
                done = record["stop"] or epoch + 1 == phase.epochs
                end = EpochEnd(p_index, phase, record, history, state, controller, best[0], done)
                for hook in hooks:
                    hook.epoch_end(end)
                if record["lr_reduced"]:
                    state["opt_state"] = set_learning_rate(state["opt_state"], controller.lr)
                if record["stop"]:
                    stopped = True
                    break
            for hook in hooks:
                hook.phase_end(phase, stopped, best[0])
    finally:
        for hook in hooks:
            hook.close()
    return best[1], history


def _start_phase(run: _Run, phase: Phase, params, resumed: Resume | None):
    """(train state, controller, first epoch, jitted step) of a phase starting from ``params``, or going on
    from ``resumed``."""
    tx = make_optimizer(phase.frozen, phase.lr)
    # a copy: the step donates its state, and ``params`` may be the best so far (returned if nothing beats it)
    params = jax.tree_util.tree_map(jnp.copy, params)
    state, controller, first_epoch = init_state(params, tx), Controller(lr=phase.lr), 0
    if resumed is not None:
        state, controller, first_epoch = resumed.restore(state), resumed.controller, resumed.next_epoch
    state["opt_state"] = set_learning_rate(state["opt_state"], controller.lr)
    step_fn = make_train_step(run.model_config, run.loss, tx, run.act, run.schedule.slab_rows)
    if run.mesh is None:
        return state, controller, first_epoch, jax.jit(step_fn, donate_argnums=0)
    state = jax.device_put(state, sharding.state_shardings(state, run.mesh))
    first_batch = run.data.val[0] if run.data.val and run.shares.count == 1 else None
    return state, controller, first_epoch, sharding.jit_train_step(step_fn, run.mesh, state, first_batch)


def _validate(run: _Run, params, phase: Phase, epoch: int) -> tuple[float, np.ndarray]:
    """(mean val loss, val Dice per class (C,): NaN for a class absent everywhere); NonFiniteLoss. With
    several shares each process validates its own volumes on its own first device and the per-volume
    metrics are gathered (``distributed.gather_rows``)."""
    if run.shares.count > 1:
        params = distributed.local_copy(params)
    vm = [jax.tree_util.tree_map(np.asarray, run.eval_step(params, v)) for v in run.data.val]
    if run.shares.count > 1:
        rows = {j: [m["loss"], *m["dice"]] for j, m in zip(run.shares.val_index, vm, strict=True)}
        table = distributed.gather_rows(rows, run.shares.n_val, (1 + run.model_config.n_classes,))
        vm = [{"loss": t[0], "dice": t[1:]} for t in table]
    val_loss = float(np.mean([m["loss"] for m in vm]))
    if not np.isfinite(val_loss):  # the last step's update broke the params: keep nothing of it
        raise NonFiniteLoss(
            f"non-finite validation loss ({val_loss}) after {phase.name} epoch {epoch + 1}: "
            "stopped (lower the learning rate?)"
        )
    return val_loss, nanmean([m["dice"] for m in vm])


def _train_batch(run: _Run, chunk: np.ndarray, epoch_id: int) -> dict:
    """The training batch of ``chunk`` ((subject, view) index pairs, (B, 2)): views augmented on this
    process's first device. On a mesh a process augments only the rows its devices hold (``local_rows``:
    all of them unless the "data" axis spans processes) and hands JAX only its depth box of them
    (``distributed.put_batch``)."""
    data, schedule = run.data, run.schedule
    mine = chunk if run.mesh is None else chunk[distributed.local_rows(len(chunk), run.mesh)]
    held = np.asarray([data.at[int(s)] for s in mine[:, 0]])
    if schedule.augment_views > 0:
        views = np.stack([held, mine[:, 0], mine[:, 1]], axis=1).astype(np.int32)
        x, y, *skel = augment_views(
            schedule.seed, epoch_id, views, data.images, data.labels, run.augment, data.skeletons
        )
    else:
        x, y = data.images[held], data.labels[held]
        skel = [] if data.skeletons is None else [data.skeletons[held]]
    batch = {"image": x, "labels": y, "class_weights": jnp.asarray(data.weights)}
    if skel:
        batch["skeleton"] = skel[0]
    return batch if run.mesh is None else distributed.put_batch(batch, run.mesh, len(chunk))


def _epoch(run: _Run, step, state, controller, best, p_index: int, phase: Phase, epoch: int):
    """One epoch of ``fit``: the training steps, validation, the controller; the new best (with the
    ``improved`` hooks called). Returns (state, record, controller, best)."""
    t0 = time.perf_counter()
    schedule = run.schedule
    seed, batch_size = schedule.seed, schedule.batch_size
    key = jax.random.fold_in(jax.random.key(seed), p_index)
    chunks = run.shares.epoch_batches(seed, p_index, epoch, schedule.views_per_volume, batch_size)
    train_losses = []
    for b, chunk in enumerate(chunks):
        batch = _train_batch(run, chunk, p_index * 100_000 + epoch)  # views never repeat across phases
        state, m = step(state, batch, key)
        loss = float(m["loss"])
        if not np.isfinite(loss):
            raise NonFiniteLoss(
                f"non-finite training loss ({loss}) in {phase.name} epoch {epoch + 1}, step "
                f"{b + 1} of {run.n_steps}: stopped (lower the learning rate?)"
            )
        train_losses.append(loss)
        for hook in run.hooks:
            hook.step_end(phase, epoch, loss)
    val_loss, val_dice = _validate(run, state["params"], phase, epoch)
    controller, events = controller_update(
        controller,
        val_loss,
        patience=schedule.patience,
        factor=schedule.plateau_factor,
        plateau_patience=schedule.plateau_patience,
        min_lr=schedule.min_lr,
        reduce_on_plateau=schedule.lr_schedule == "plateau",
    )
    record = {
        "phase": phase.name,
        "epoch": epoch + 1,
        "train_loss": float(np.mean(train_losses)),
        "val_loss": val_loss,
        "val_dice": _none_if_nan(nanmean(val_dice[1:])),
        "val_dice_per_class": [_none_if_nan(d) for d in val_dice],
        "lr": float(get_learning_rate(state["opt_state"])),
        "seconds": round(time.perf_counter() - t0, 2),
        **events,
    }
    if val_loss < best[0]:
        best = (val_loss, jax.tree_util.tree_map(jnp.array, state["params"]))
        for hook in run.hooks:
            hook.improved(best[1], record)
    return state, record, controller, best
