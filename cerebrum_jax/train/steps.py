"""The Optax fine-tuning core: init from a checkpoint, optimizer with frozen layers, train/eval steps,
and the host-side early-stopping / reduce-on-plateau controller.

The train state is a plain pytree dict {"params", "opt_state", "step"}. Steps are pure and NOT jitted:
callers jit them (``jax.jit(step, donate_argnums=0)``, or ``sharding.jit_train_step`` over a mesh).
Batches are {"image": (B, D, H, W, 1) float32, "labels": (B, D, H, W) int32, "class_weights": (C,)
float32} (+ "skeleton": (B, D, H, W) uint8, the tubed reference skeleton, for a loss with a skeleton
recall term). The epoch loop over these is ``loop.fit``; a whole fold (data, phases, run directory) is
``finetune.train_and_evaluate``. This module imports neither.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from cerebrum_jax.errors import InputError
from cerebrum_jax.model import network as model
from cerebrum_jax.model.network import LAYER_NAMES, ModelConfig
from cerebrum_jax.train import losses, streamed
from cerebrum_jax.train.losses import LossConfig

INIT_TAG = 0x696E6974  # fold_in tags: new-layer init and dropout keys never collide with augmentation's
DROPOUT_TAG = 0x64726F70


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
            return losses.loss_terms(
                logits, batch["labels"], batch["class_weights"], loss_config, batch.get("skeleton")
            )

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
        _, metrics = losses.loss_terms(
            logits, batch["labels"], batch["class_weights"], loss_config, batch.get("skeleton")
        )
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
    c: Controller,
    val_loss: float,
    *,
    patience: int,
    factor: float,
    plateau_patience: int,
    min_lr: float,
    reduce_on_plateau: bool = True,
) -> tuple[Controller, dict]:
    """Feed one epoch's val loss -> (new controller, events {"improved", "lr_reduced", "stop"});
    ``reduce_on_plateau`` False: early stopping only (the learning rate follows a schedule)."""
    improved = val_loss < c.best
    best, wait = (val_loss, 0) if improved else (c.best, c.wait + 1)
    lr, reduced = c.lr, False
    if val_loss < c.plateau_best - 1e-4:
        plateau_best, plateau_wait = val_loss, 0
    else:
        plateau_best, plateau_wait = c.plateau_best, c.plateau_wait + 1
        if reduce_on_plateau and plateau_wait >= plateau_patience and c.lr > min_lr:
            lr, reduced, plateau_wait = max(c.lr * factor, min_lr), True, 0
    stop = wait >= patience
    new = Controller(lr, best, wait, plateau_best, plateau_wait, stop)
    return new, {"improved": improved, "lr_reduced": reduced, "stop": stop}
