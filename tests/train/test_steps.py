"""Train step, frozen layers, optimizer state, init from a real Orbax checkpoint, plateau controller."""

import json
import os
import stat

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cerebrum_jax.errors import InputError
from cerebrum_jax.experiment import runhooks
from cerebrum_jax.model import checkpoint
from cerebrum_jax.model.network import LAYER_NAMES, ModelConfig, init_params
from cerebrum_jax.train import steps as train
from cerebrum_jax.train.losses import LossConfig

SHAPE = (16, 16, 16)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A real on-disk checkpoint of a tiny 3-class network (n_filters 2)."""
    cfg = ModelConfig(n_filters=2, n_classes=3)
    params = init_params(cfg, jax.random.key(7))
    path = tmp_path_factory.mktemp("ck") / "ckpt"
    checkpoint.save_checkpoint(path, params, cfg, classes=["bg", "a", "b"])
    return checkpoint.load_checkpoint(path)


def _batch(seed, n_classes=4):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_classes, (1, *SHAPE)).astype(np.int32)
    image = (labels[..., None] + rng.normal(0, 0.3, labels.shape + (1,))).astype(np.float32)
    return {
        "image": jnp.asarray(image),
        "labels": jnp.asarray(labels),
        "class_weights": jnp.ones(n_classes, jnp.float32),
    }


@pytest.mark.parametrize("last_layer", [1, 3, 14])
def test_load_finetune_init(ckpt, last_layer):
    params, frozen = train.load_finetune_init(ckpt, 4, last_layer, jax.random.key(0))
    copied = LAYER_NAMES[: len(LAYER_NAMES) - last_layer]
    assert "main_output" not in copied
    assert params["main_output"]["kernel"].shape[-1] == 4
    for name in LAYER_NAMES:
        same = np.array_equal(params[name]["kernel"], ckpt.params[name]["kernel"])
        assert same == (name in copied), name
        assert frozen[name]["kernel"] == frozen[name]["bias"] == (name in copied)


@pytest.mark.parametrize("last_layer", [0, 15])
def test_last_layer_out_of_range(ckpt, last_layer):
    with pytest.raises(InputError):
        train.load_finetune_init(ckpt, 4, last_layer, jax.random.key(0))


def _run(ckpt, n_steps, seed=0, last_layer=3):
    params, frozen = train.load_finetune_init(ckpt, 4, last_layer, jax.random.key(seed))
    before = jax.tree_util.tree_map(np.array, params)  # the state is donated: keep a host copy
    cfg = train.finetune_model_config(ckpt, 4)
    tx = train.make_optimizer(frozen, 1e-2)
    state = train.init_state(params, tx)
    step = jax.jit(train.make_train_step(cfg, LossConfig(loss="ce+dice"), tx), donate_argnums=0)
    for i in range(n_steps):
        state, metrics = step(state, _batch(i), jax.random.key(seed))
    return before, frozen, state, metrics


@pytest.mark.slow
def test_step_updates_unfrozen_only_and_no_state_for_frozen(ckpt):
    before, frozen, state, metrics = _run(ckpt, 1)
    assert np.isfinite(float(metrics["loss"])) and int(state["step"]) == 1
    for name in LAYER_NAMES:
        for part in ("kernel", "bias"):
            changed = not np.array_equal(
                np.asarray(state["params"][name][part]), np.asarray(before[name][part])
            )
            assert changed != frozen[name][part], (name, part)
    adam = state["opt_state"].inner_states["train"].inner_state.inner_state[0]
    n_state = len(jax.tree_util.tree_leaves(adam.mu))
    n_trainable = sum(not f for f in jax.tree_util.tree_leaves(frozen))
    assert n_state == n_trainable == 6


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_two_steps_reproducible(ckpt, seed):
    a = _run(ckpt, 2, seed)[2]["params"]
    b = _run(ckpt, 2, seed)[2]["params"]
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y))


def test_learning_rate_injection(ckpt):
    _, frozen = train.load_finetune_init(ckpt, 4, 3, jax.random.key(0))
    tx = train.make_optimizer(frozen, 1e-3)
    state = train.init_state(init_params(ModelConfig(n_filters=2, n_classes=4), jax.random.key(1)), tx)
    assert train.get_learning_rate(state["opt_state"]) == pytest.approx(1e-3)
    changed = train.set_learning_rate(state["opt_state"], 2.5e-4)
    assert train.get_learning_rate(changed) == pytest.approx(2.5e-4)
    assert jax.tree_util.tree_structure(changed) == jax.tree_util.tree_structure(state["opt_state"])


@pytest.mark.slow
def test_eval_step_metrics(ckpt):
    params, _ = train.load_finetune_init(ckpt, 4, 3, jax.random.key(0))
    cfg = train.finetune_model_config(ckpt, 4)
    m = jax.jit(train.make_eval_step(cfg, LossConfig()))(params, _batch(0))
    assert m["dice"].shape == m["soft_dice"].shape == (4,)
    assert np.all((np.asarray(m["dice"]) >= 0) & (np.asarray(m["dice"]) <= 1))


KW = {"patience": 4, "factor": 0.25, "plateau_patience": 2, "min_lr": 1e-3}


@pytest.mark.parametrize(
    "val_losses",
    [
        [1.0, 0.9, 0.8, 0.7],
        [1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
        [1.0, 0.5, 0.6, 0.55, 0.7, 0.4, 0.9, 0.9, 0.9, 0.9],
        [1.0, 0.99995, 0.9999, 0.99985, 0.9998],
    ],
)
def test_controller_on_scripted_losses(val_losses):
    """Compare with a straightforward re-statement of Keras's EarlyStopping + ReduceLROnPlateau rules."""
    c = train.Controller(lr=0.1)
    best, wait, pbest, pwait, lr = np.inf, 0, np.inf, 0, 0.1
    for v in val_losses:
        c, events = train.controller_update(c, v, **KW)
        if v < best:
            best, wait = v, 0
        else:
            wait += 1
        if v < pbest - 1e-4:
            pbest, pwait = v, 0
        else:
            pwait += 1
            if pwait >= KW["plateau_patience"] and lr > KW["min_lr"]:
                lr, pwait = max(lr * KW["factor"], KW["min_lr"]), 0
        assert c.best == best and c.wait == wait and c.lr == pytest.approx(lr)
        assert events["stop"] == (wait >= KW["patience"])
        if events["stop"]:
            break


def test_controller_stops_and_floors_lr():
    c = train.Controller(lr=0.1)
    stops = []
    for v in [1.0] + [2.0] * 10:
        c, e = train.controller_update(c, v, **KW)
        stops.append(e["stop"])
    assert stops.index(True) == KW["patience"]
    assert c.lr == pytest.approx(KW["min_lr"])


def test_save_last_round_trip_with_default_permissions(tmp_path):
    state = {"params": {"w": jnp.arange(3.0)}, "step": jnp.asarray(2, jnp.int32)}
    old = os.umask(0o022)
    try:
        runhooks.save_last(tmp_path / "last", state, {"phase": 0})
        # the second replaces the first and leaves nothing beside it
        runhooks.save_last(tmp_path / "last", state, {"phase": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "last").stat().st_mode) == 0o755
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]
    loop = json.loads((tmp_path / "last" / "loop.json").read_text())
    assert loop.pop("state_sha256") == checkpoint.state_digest(tmp_path / "last" / "state")
    assert loop == {"phase": 1}
    back = runhooks.load_last(tmp_path / "last", state)
    np.testing.assert_array_equal(back["params"]["w"], np.arange(3.0))
