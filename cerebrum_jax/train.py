"""The Optax fine-tuning core: init from a checkpoint, optimizer with frozen layers, train/eval steps,
and the host-side early-stopping / reduce-on-plateau controller.

The train state is a plain pytree dict {"params", "opt_state", "step"}. Steps are pure and NOT jitted:
callers jit them (``jax.jit(step, donate_argnums=0)``, or ``sharding.jit_train_step`` over a mesh).
Batches are {"image": (B, D, H, W, 1) float32, "labels": (B, D, H, W) int32, "class_weights": (C,)
float32}. The whole fold (data, phases, run directory) is ``finetune.run_fold`` / ``train_and_evaluate``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from tqdm import tqdm

from cerebrum_jax import distributed, losses, model, sharding, streamed
from cerebrum_jax.augment import AugmentConfig, augment_batch, view_key
from cerebrum_jax.checkpoint import load_checkpoint, state_digest
from cerebrum_jax.errors import InputError
from cerebrum_jax.fsafe import deferred_interrupt, replace_dir, write_text
from cerebrum_jax.losses import LossConfig
from cerebrum_jax.model import LAYER_NAMES, ModelConfig

INIT_TAG = 0x696E6974  # fold_in tags: new-layer init and dropout keys never collide with augmentation's
DROPOUT_TAG = 0x64726F70


class NonFiniteLoss(RuntimeError):
    """A NaN/inf training or validation loss: the run stops before saving anything of that epoch, so
    checkpoints/last and checkpoints/best stay as the last good epoch left them (or were never written).
    ``finetune.run_fold`` adds to the message which of them exist."""


# ----------------------------------------------------------------------------------------------------------
# Initialisation from a checkpoint


def copied_layers(last_layer: int) -> tuple[str, ...]:
    """Layer names copied from the checkpoint: all but the last ``last_layer`` (1..14) of LAYER_NAMES.

    main_output is never copied (its width is the number of classes), so last_layer = 1 retrains it alone
    and last_layer = 14 copies nothing.
    """
    if not 1 <= last_layer <= len(LAYER_NAMES):
        raise InputError(f"last_layer must be in 1..{len(LAYER_NAMES)}, got {last_layer}", "last_layer")
    return tuple(LAYER_NAMES[: len(LAYER_NAMES) - last_layer])


def finetune_model_config(ckpt, n_classes: int, dropout_rate: float | None = None) -> ModelConfig:
    """The checkpoint's ModelConfig with ``n_classes`` outputs (and ``dropout_rate`` when given)."""
    config = dataclasses.replace(ckpt.config, n_classes=n_classes)
    if dropout_rate is not None:
        config = dataclasses.replace(config, dropout_rate=dropout_rate)
    return config


def load_finetune_init(ckpt, n_classes: int, last_layer: int, key: jax.Array) -> tuple[dict, dict]:
    """Parameters of a new ``n_classes`` network from ``ckpt`` (a ``checkpoint.Checkpoint``).

    Copies every layer of ``copied_layers(last_layer)`` (explicit names, no pattern matching); the others
    get a fresh glorot-normal init from ``key``. Returns (params, frozen_mask): frozen_mask is a pytree
    like params with True on the copied layers (frozen during warm-up).
    """
    config = finetune_model_config(ckpt, n_classes)
    fresh = model.init_params(config, jax.random.fold_in(key, INIT_TAG))
    copied = set(copied_layers(last_layer))
    params, frozen = {}, {}
    for name in LAYER_NAMES:
        source = ckpt.params[name] if name in copied else fresh[name]
        for part in ("kernel", "bias"):
            if tuple(source[part].shape) != tuple(fresh[name][part].shape):
                raise InputError(
                    f"layer {name} {part} has shape {tuple(source[part].shape)}, the new network "
                    f"{tuple(fresh[name][part].shape)}",
                    "--weights",
                )
        params[name] = {k: jnp.asarray(v, jnp.float32) for k, v in source.items()}
        frozen[name] = {k: name in copied for k in source}
    return params, frozen


def init_from_scratch(config: ModelConfig, key: jax.Array) -> tuple[dict, dict]:
    """(random glorot-normal params of ``config``, frozen mask all False): training from scratch."""
    params = model.init_params(config, jax.random.fold_in(key, INIT_TAG))
    frozen = jax.tree_util.tree_map(lambda _: False, params)
    return params, frozen


# ----------------------------------------------------------------------------------------------------------
# Optimizer


def make_optimizer(frozen_mask, lr: float, **adam_kwargs) -> optax.GradientTransformation:
    """Adam on the params whose ``frozen_mask`` leaf is False; frozen ones get zero updates and no state.

    The learning rate is an injected hyperparameter: ``set_learning_rate`` changes it between epochs.
    """
    labels = jax.tree_util.tree_map(lambda f: "frozen" if f else "train", frozen_mask)
    adam = optax.inject_hyperparams(optax.adam)(learning_rate=lr, **adam_kwargs)
    return optax.multi_transform({"train": adam, "frozen": optax.set_to_zero()}, labels)


def _map_hyperparams(opt_state, fn):
    """Rebuild ``opt_state`` with ``fn(hyperparams dict)`` applied to every inject_hyperparams state."""
    if hasattr(opt_state, "hyperparams") and isinstance(opt_state.hyperparams, dict):
        return opt_state._replace(hyperparams=fn(opt_state.hyperparams))
    if isinstance(opt_state, tuple) and hasattr(opt_state, "_fields"):
        return type(opt_state)(*(_map_hyperparams(s, fn) for s in opt_state))
    if isinstance(opt_state, tuple | list):
        return type(opt_state)(_map_hyperparams(s, fn) for s in opt_state)
    if isinstance(opt_state, dict):
        return {k: _map_hyperparams(v, fn) for k, v in opt_state.items()}
    return opt_state


def set_learning_rate(opt_state, lr: float):
    """A copy of ``opt_state`` (from ``make_optimizer``) with learning rate ``lr``."""
    return _map_hyperparams(opt_state, lambda h: {**h, "learning_rate": jnp.asarray(lr, jnp.float32)})


def get_learning_rate(opt_state) -> float | None:
    found = []
    _map_hyperparams(opt_state, lambda h: found.append(float(h["learning_rate"])) or h)
    return found[0] if found else None


def init_state(params, tx: optax.GradientTransformation) -> dict:
    return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}


# ----------------------------------------------------------------------------------------------------------
# Steps


def _check_batch(batch: dict) -> None:
    image, labels = batch["image"], batch["labels"]
    if image.ndim != 5 or image.shape[-1] != 1 or labels.shape != image.shape[:-1]:
        raise ValueError(
            f"batch image (B, D, H, W, 1) / labels (B, D, H, W) expected: {image.shape}, {labels.shape}"
        )


def make_train_step(
    model_config: ModelConfig,
    loss_config: LossConfig,
    tx: optax.GradientTransformation,
    act_sharding=None,
    slab_rows: int = 0,
) -> Callable:
    """``step(state, batch, key) -> (state, metrics)``: one Adam step on one batch (pure, not jitted).

    Dropout uses ``fold_in(key, state["step"])``; metrics: loss, ce, dice_loss, grad_norm (scalars).
    ``slab_rows`` > 0: the same loss computed in depth slabs of that many rows (``streamed.loss_terms``,
    bounded memory for whole volumes).
    """

    def step(state, batch, key):
        _check_batch(batch)
        dropout_key = jax.random.fold_in(jax.random.fold_in(key, DROPOUT_TAG), state["step"])

        def loss_fn(params):
            if slab_rows:
                return streamed.loss_terms(params, model_config, loss_config, batch, slab_rows, dropout_key)
            logits = model.apply(
                params, model_config, batch["image"], train=True, key=dropout_key, act_sharding=act_sharding
            )
            return losses.loss_terms(logits, batch["labels"], batch["class_weights"], loss_config)

        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {**metrics, "grad_norm": optax.tree.norm(grads)}
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

    return step


def make_eval_step(
    model_config: ModelConfig, loss_config: LossConfig, act_sharding=None, slab_rows: int = 0
) -> Callable:
    """``eval(params, batch) -> metrics``: loss terms, soft Dice (C,) and argmax Dice (C,), no dropout
    (``slab_rows`` > 0: computed in depth slabs, ``streamed.eval_metrics``)."""

    def evaluate(params, batch):
        _check_batch(batch)
        if slab_rows:
            return streamed.eval_metrics(params, model_config, loss_config, batch, slab_rows)
        logits = model.apply(params, model_config, batch["image"], train=False, act_sharding=act_sharding)
        _, metrics = losses.loss_terms(logits, batch["labels"], batch["class_weights"], loss_config)
        metrics["soft_dice"] = losses.soft_dice_per_class(logits, batch["labels"])
        pred = jnp.argmax(logits, axis=-1)
        metrics["dice"] = losses.hard_dice_per_class(pred, batch["labels"], model_config.n_classes)
        return metrics

    return evaluate


# ----------------------------------------------------------------------------------------------------------
# Early stopping and reduce-on-plateau (Keras semantics, host side, between epochs)


@dataclasses.dataclass(frozen=True)
class Controller:
    """State of one phase's callbacks. ``best``: lowest val loss so far; ``wait``: epochs since it (early
    stopping, min_delta 0); ``plateau_best`` / ``plateau_wait``: the same with Keras's ReduceLROnPlateau
    min_delta 1e-4; ``lr``: current learning rate; ``stop``: early stopping fired."""

    lr: float
    best: float = float("inf")
    wait: int = 0
    plateau_best: float = float("inf")
    plateau_wait: int = 0
    stop: bool = False


def controller_update(
    c: Controller, val_loss: float, *, patience: int, factor: float, plateau_patience: int, min_lr: float
) -> tuple[Controller, dict]:
    """Feed one epoch's val loss -> (new controller, events {"improved", "lr_reduced", "stop"})."""
    improved = val_loss < c.best
    best, wait = (val_loss, 0) if improved else (c.best, c.wait + 1)
    lr, reduced = c.lr, False
    if val_loss < c.plateau_best - 1e-4:
        plateau_best, plateau_wait = val_loss, 0
    else:
        plateau_best, plateau_wait = c.plateau_best, c.plateau_wait + 1
        if plateau_wait >= plateau_patience and c.lr > min_lr:
            lr, reduced, plateau_wait = max(c.lr * factor, min_lr), True, 0
    stop = wait >= patience
    new = Controller(lr, best, wait, plateau_best, plateau_wait, stop)
    return new, {"improved": improved, "lr_reduced": reduced, "stop": stop}


# ----------------------------------------------------------------------------------------------------------
# Resumable state (checkpoints/last)


def save_last(path: Path, state: dict, loop: dict) -> None:
    """Orbax state {"params", "opt_state", "step"} + loop.json, written beside and renamed into place.

    In a multi-process run every process saves (Orbax multi-process) and process 0 writes loop.json."""
    if distributed.process_count() > 1:
        return distributed.save_state(path, state, {"loop.json": json.dumps(loop, indent=1) + "\n"})
    path = Path(path).absolute()  # Orbax refuses relative checkpoint paths
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        with deferred_interrupt(), ocp.StandardCheckpointer() as ckptr:  # Ctrl-C: after the save
            ckptr.save(tmp / "state", state)
            ckptr.wait_until_finished()
        loop = {**loop, "state_sha256": state_digest(tmp / "state")}  # checked on --resume (runguard)
        (tmp / "loop.json").write_text(json.dumps(loop, indent=1) + "\n")
        replace_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_last(path: Path, like_state: dict) -> dict:
    if distributed.process_count() > 1:
        return distributed.restore_state(path, like_state)
    try:
        with deferred_interrupt(), ocp.StandardCheckpointer() as ckptr:
            return ckptr.restore(Path(path).absolute() / "state", target=like_state)
    except (ValueError, OSError, KeyError, RuntimeError) as e:  # corrupt or foreign: no Orbax traceback
        reason = " ".join(str(e).split())[:150]
        raise InputError(f"cannot restore ({type(e).__name__}: {reason}); cannot resume", path) from None


# ----------------------------------------------------------------------------------------------------------
# The phases


@dataclasses.dataclass
class Phase:
    name: str
    lr: float
    epochs: int
    frozen: dict  # pytree like params, True = not trained in this phase


def nanmean(values) -> np.ndarray:
    """Mean over the first axis ignoring NaN (n/a Dice), NaN where all are NaN, without a warning."""
    values = np.asarray(values, np.float64)
    count = np.sum(~np.isnan(values), axis=0)
    total = np.nansum(values, axis=0)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _none_if_nan(value) -> float | None:
    value = float(value)
    return None if np.isnan(value) else value


def _stack(vols, key):
    return jnp.asarray(np.stack([v[key] for v in vols]))


def fit(
    cfg,
    model_config,
    params,
    phases: list[Phase],
    fold_data: dict,
    run_dir: Path,
    *,
    log=print,
    resume: bool = False,
    save_best=None,
    progress: bool = True,
    mesh=None,
):
    """Train ``params`` through ``phases`` on fold_data["train"], validating on fold_data["val"].

    Each phase: Adam (frozen leaves untouched), up to ``epochs`` epochs of ``augment_views`` augmented views
    per training volume (or the volumes as they are), val loss after each epoch, reduce-on-plateau, early
    stopping, best params kept (and passed to ``save_best(params, record)``); the next phase starts from
    the best params. Returns (best params, history: one dict per epoch). With a ``mesh`` (see
    ``sharding``), every step runs sharded: batches split (B over "data", D over "space"), state replicated.
    """
    loss_cfg = losses.LossConfig(cfg.loss, cfg.class_weights)
    n_classes = model_config.n_classes
    weights = losses.balanced_class_weights([v["labels"] for v in fold_data["train"]], n_classes)
    images, labels = _stack(fold_data["train"], "x")[..., None], _stack(fold_data["train"], "labels")
    val = [
        {
            "image": jnp.asarray(v["x"][None, ..., None]),
            "labels": jnp.asarray(v["labels"][None]),
            "class_weights": jnp.asarray(weights),
        }
        for v in fold_data["val"]
    ]
    act = sharding.activation_sharding(mesh) if mesh is not None else None
    if mesh is not None:
        val = [sharding.put_batch(v, mesh) for v in val]
    aug_cfg = AugmentConfig.from_dict(dict(cfg.augment), "augment")
    slab_rows = cfg.slab_rows or 0  # finetune.run_fold resolves None (automatic)
    eval_step = jax.jit(make_eval_step(model_config, loss_cfg, act, slab_rows))
    last_dir = run_dir / "checkpoints" / "last"
    history, start_phase, start_epoch, controller, best = [], 0, 0, None, (float("inf"), params)
    resumed_state = None
    if resume and (last_dir / "loop.json").is_file():
        loop = json.loads((last_dir / "loop.json").read_text())
        history, start_phase, start_epoch = loop["history"], loop["phase"], loop["next_epoch"]
        controller = Controller(**loop["controller"]) if loop["controller"] else None
        best_params = (
            load_checkpoint(run_dir / "checkpoints" / "best").params if loop["best"] < np.inf else params
        )
        best = (loop["best"], jax.tree_util.tree_map(jnp.asarray, best_params))
        resumed_state = controller is not None  # None: the phase had finished; start the next fresh
        log(f"resuming at phase {phases[min(start_phase, len(phases) - 1)].name}, epoch {start_epoch + 1}")
    n_views = max(cfg.augment_views, 1)
    n_steps = -(-len(fold_data["train"]) * n_views // cfg.batch_size)
    for p_index in range(start_phase, len(phases)):
        phase = phases[p_index]
        if phase.epochs == 0:
            continue
        tx = make_optimizer(phase.frozen, phase.lr)
        state = init_state(best[1], tx)
        first_epoch = 0
        if resumed_state and p_index == start_phase:
            state = load_last(last_dir, state)
            first_epoch = start_epoch
        else:
            controller = Controller(lr=phase.lr)
        state["opt_state"] = set_learning_rate(state["opt_state"], controller.lr)
        step_fn = make_train_step(model_config, loss_cfg, tx, act, slab_rows)
        if mesh is None:
            step = jax.jit(step_fn, donate_argnums=0)
        else:
            state = jax.device_put(state, sharding.state_shardings(state, mesh))
            step = sharding.jit_train_step(step_fn, mesh, state, val[0] if val else None)
        key = jax.random.fold_in(jax.random.key(cfg.seed), p_index)
        bar = tqdm(
            total=phase.epochs * n_steps,
            initial=first_epoch * n_steps,
            desc=phase.name,
            disable=not progress,
            unit="step",
            dynamic_ncols=True,
        )
        stopped = False
        for epoch in range(first_epoch, phase.epochs):
            t0 = time.perf_counter()
            rng = np.random.default_rng([cfg.seed, p_index, epoch])
            order = rng.permutation([(s, v) for s in range(len(images)) for v in range(n_views)])
            train_losses = []
            for b in range(0, len(order), cfg.batch_size):
                chunk = order[b : b + cfg.batch_size]
                x, y = images[chunk[:, 0]], labels[chunk[:, 0]]
                if cfg.augment_views > 0:
                    epoch_id = p_index * 100_000 + epoch  # views never repeat across phases either
                    keys = jnp.stack([view_key(cfg.seed, epoch_id, int(s), int(v)) for s, v in chunk])
                    x, y = augment_batch(keys, x, y, aug_cfg)
                batch = {"image": x, "labels": y, "class_weights": jnp.asarray(weights)}
                if mesh is not None:
                    batch = sharding.put_batch(batch, mesh)
                state, m = step(state, batch, key)
                loss = float(m["loss"])
                if not np.isfinite(loss):
                    bar.close()
                    raise NonFiniteLoss(
                        f"non-finite training loss ({loss}) in {phase.name} epoch {epoch + 1}, step "
                        f"{b // cfg.batch_size + 1} of {n_steps}: stopped (lower the learning rate?)"
                    )
                train_losses.append(loss)
                bar.set_postfix_str(f"epoch {epoch + 1}/{phase.epochs} loss {loss:.4f}")
                bar.update(1)
            vm = [jax.tree_util.tree_map(np.asarray, eval_step(state["params"], v)) for v in val]
            val_loss = float(np.mean([m["loss"] for m in vm]))
            if not np.isfinite(val_loss):  # the last step's update broke the params: keep nothing of it
                bar.close()
                raise NonFiniteLoss(
                    f"non-finite validation loss ({val_loss}) after {phase.name} epoch {epoch + 1}: "
                    "stopped (lower the learning rate?)"
                )
            val_dice = nanmean([m["dice"] for m in vm])  # (C,): NaN for a class absent everywhere
            controller, events = controller_update(
                controller,
                val_loss,
                patience=cfg.patience,
                factor=cfg.plateau_factor,
                plateau_patience=cfg.plateau_patience,
                min_lr=cfg.min_lr,
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
            history.append(record)
            if val_loss < best[0]:
                best = (val_loss, jax.tree_util.tree_map(jnp.array, state["params"]))
                if save_best is not None:
                    save_best(best[1], record)
            log(
                f"{phase.name} epoch {epoch + 1}: train {record['train_loss']:.4f} val {val_loss:.4f} "
                f"val dice {record['val_dice'] or float('nan'):.4f} lr {record['lr']:.2e}"
                + (" *" if events["improved"] else "")
            )
            if distributed.is_main():
                write_text(run_dir / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history))
            if events["lr_reduced"]:
                state["opt_state"] = set_learning_rate(state["opt_state"], controller.lr)
            done = events["stop"] or epoch + 1 == phase.epochs
            save_last(
                last_dir,
                state,
                {
                    "phase": p_index + 1 if done else p_index,
                    "next_epoch": 0 if done else epoch + 1,
                    "controller": None if done else dataclasses.asdict(controller),
                    "best": best[0],
                    "history": history,
                },
            )
            if events["stop"]:
                stopped = True
                break
        bar.close()
        log(f"{phase.name}: {'early stop' if stopped else 'all epochs run'}, best val loss {best[0]:.4f}")
    return best[1], history


def train_and_evaluate(config, workdir) -> dict:
    """One fold of fine-tuning and evaluation (flax examples style); see ``finetune.run_fold``."""
    from cerebrum_jax.finetune import run_fold  # the loop imports this module: import late

    return run_fold(config, workdir)
