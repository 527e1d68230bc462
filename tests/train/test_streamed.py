"""The streamed (depth-slab) training step equals the plain one: loss, gradients, one Adam update.

Small shapes (D = 24 rows, 4 filters, 3 classes): slabs of 4 (one level-2 row, the smallest), 8, 16 and
20 (not dividing 24: the last slab overlaps) and 24 (one slab); dice / ce / ce+dice; balanced, sqrt,
thin and no class weights; frozen layers; dropout with the same keys; batch 2; bf16. Tolerance: relative
1e-5 in float32 (differences are summation order only). bf16 (8 significant bits; the two paths round partial
sums at different points, e.g. a bias gradient summed per slab): both bf16 steps against the float32
step, the streamed one no further from it than twice the plain one or 5 % (2^-8 over 14 layers),
relative L2 over all gradients; loss within 1 %.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tolerances import adam_mu, assert_first_updates_close, assert_leaves_close, dice_flip_bound

from cerebrum_jax.model import network as model
from cerebrum_jax.model.network import LAYER_NAMES, ModelConfig, init_params
from cerebrum_jax.train import steps as train
from cerebrum_jax.train import streamed
from cerebrum_jax.train.losses import LossConfig

SHAPE = (24, 16, 8)
CFG = ModelConfig(n_filters=4, n_classes=3, dropout_rate=0.1)
LR = 1e-3
# Compile fast (about 4x less compile time here; the same computation, scheduled less cleverly).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _compiled(fn, *args):
    return jax.jit(fn).lower(*args).compile(FAST_COMPILE)(*args)


def _batch(batch_size, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, (batch_size, *SHAPE)).astype(np.int32)
    image = (labels[..., None] + rng.normal(0, 0.5, labels.shape + (1,))).astype(np.float32)
    weights = np.array([0.5, 1.0, 2.5], np.float32)
    return {"image": jnp.asarray(image), "labels": jnp.asarray(labels), "class_weights": jnp.asarray(weights)}


def _frozen(params, frozen_layers):
    return {n: {k: n in frozen_layers for k in params[n]} for n in params}


def _step(slab, loss, weights, dropout, batch_size, frozen_layers, precision):
    """(metrics, new state) of one jitted train step with ``slab`` rows (0: the plain step)."""
    cfg = dataclasses.replace(CFG, dropout_rate=0.1 if dropout else 0.0, compute_dtype=precision)
    params = init_params(cfg, jax.random.key(3))
    tx = train.make_optimizer(_frozen(params, frozen_layers), LR)
    step = train.make_train_step(cfg, LossConfig(loss, weights, thin_classes=(2,)), tx, slab_rows=slab)
    state, metrics = _compiled(step, train.init_state(params, tx), _batch(batch_size), jax.random.key(11))
    state["update"] = jax.tree_util.tree_map(jnp.subtract, state["params"], params)
    return jax.tree_util.tree_map(np.asarray, metrics), jax.tree_util.tree_map(np.asarray, state)


FROZEN = tuple(LAYER_NAMES[:-3])  # the default warm-up: all but the last 3 layers frozen

# slab, loss, class weights, dropout, batch size, frozen layers, precision
CASES = [
    (4, "dice", "balanced", True, 1, (), "float32"),
    (8, "ce", "sqrt", True, 2, (), "float32"),
    (20, "ce+dice", "none", False, 1, FROZEN, "float32"),
    (24, "ce+dice", "balanced", True, 2, FROZEN, "float32"),
    (12, "ce", "thin", False, 1, (), "float32"),
]


@pytest.mark.slow
@pytest.mark.parametrize("slab, loss, weights, dropout, batch_size, frozen_layers, precision", CASES)
def test_streamed_step_equals_plain(slab, loss, weights, dropout, batch_size, frozen_layers, precision):
    rtol = 1e-5
    args = (loss, weights, dropout, batch_size, frozen_layers, precision)
    plain_metrics, plain = _step(0, *args)
    metrics, state = _step(slab, *args)
    for name in ("loss", "ce", "dice_loss", "grad_norm"):
        np.testing.assert_allclose(metrics[name], plain_metrics[name], rtol=rtol, err_msg=name)
    mu = adam_mu(plain["opt_state"])
    assert_leaves_close(mu, adam_mu(state["opt_state"]), rtol)  # the gradients (mu = 0.1 g)
    # one Adam update, within what the gradients' tolerance allows (tolerances.adam_update_bound)
    assert_first_updates_close(mu, plain["params"], state["update"], plain["update"], rtol, LR)
    for name in frozen_layers:  # frozen layers stay exactly as they were
        assert not np.any(state["update"][name]["kernel"]) and not np.any(state["update"][name]["bias"])


@pytest.mark.slow
def test_streamed_eval_equals_plain():
    """Validation metrics (loss terms, soft and argmax Dice per class) slab by slab, slab 16 of 24 rows."""
    params, batch, loss = init_params(CFG, jax.random.key(5)), _batch(2, seed=1), LossConfig("ce+dice")
    plain = _compiled(train.make_eval_step(CFG, loss), params, batch)
    ours = _compiled(train.make_eval_step(CFG, loss, slab_rows=16), params, batch)
    assert set(ours) == set(plain)
    for name in set(plain) - {"dice"}:  # sums of smooth terms: float rounding only
        np.testing.assert_allclose(ours[name], plain[name], rtol=1e-5, err_msg=name)
    # Argmax Dice: the two paths' logits agree to float rounding, tau = 1e-5 of their scale (the loss
    # terms' tolerance), so only a voxel whose top-2 margin is within 2 tau may take another class in
    # one path than in the other; each such near tie may move a class's Dice by dice_flip_bound. Not
    # counted: exact ties of all-zero logits (this fresh network's zero biases where every ReLU before
    # the head is off, 227 voxels here: zero in any summation order, argmax class 0 in both paths). No
    # other margin within 2 tau here (the smallest is 5.7 tau), so the Dice are as strict as the rest.
    logits = _compiled(lambda p, x: model.apply(p, CFG, x, train=False), params, batch["image"])
    logits, labels = np.asarray(logits), np.asarray(batch["labels"])
    top2 = np.sort(logits, axis=-1)[..., -2:]
    margin, dead = top2[..., 1] - top2[..., 0], np.all(logits == 0, axis=-1)
    near = int(np.sum((margin <= 2 * 1e-5 * np.max(np.abs(logits))) & ~dead))
    pred = np.argmax(logits, axis=-1)
    totals = [np.sum(pred == c) + np.sum(labels == c) for c in range(CFG.n_classes)]
    diff, allowed = np.abs(ours["dice"] - plain["dice"]), 1e-5 * np.abs(plain["dice"])
    assert np.all(diff <= allowed + dice_flip_bound(near, totals)), (ours["dice"], plain["dice"], near)


@pytest.mark.parametrize("slab", [0, 6, -4])
def test_bad_slab_rows(slab):
    with pytest.raises(ValueError, match="multiple of 4"):
        streamed.check_slab_rows(slab, 24)


def test_auto_slab_rows():
    assert streamed.auto_slab_rows((64, 88, 56)) == 0  # the demo grid: the plain step fits
    assert streamed.auto_slab_rows((256, 352, 224)) == streamed.AUTO_SLAB


def _rel_l2(a, b) -> float:
    """||a - b|| / ||b|| over all leaves."""
    fa = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(a)])
    fb = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(b)])
    return float(np.linalg.norm(fa - fb) / np.linalg.norm(fb))


@pytest.mark.slow
def test_streamed_bf16_step_as_close_to_float32_as_the_plain_one():
    args = ("ce+dice", "balanced", True, 1, ())
    ref_metrics, ref = _step(0, *args, "float32")
    plain_metrics, plain = _step(0, *args, "bfloat16")
    metrics, state = _step(8, *args, "bfloat16")
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-2)
    np.testing.assert_allclose(metrics["loss"], plain_metrics["loss"], rtol=1e-2)
    plain_err = _rel_l2(adam_mu(plain["opt_state"]), adam_mu(ref["opt_state"]))
    err = _rel_l2(adam_mu(state["opt_state"]), adam_mu(ref["opt_state"]))
    # plain_err depends on the host (native bf16 dot products on AMX, emulated ones on AVX2 round
    # partial sums at different points), so a floor that does not: 0.05, about bf16's rounding (2^-8)
    # compounded over the 14 layers a gradient passes; a wrong streamed gradient is off by O(1)
    assert err <= max(2 * plain_err, 0.05), (err, plain_err)


@pytest.mark.slow
def test_streamed_skeleton_recall_equals_plain():
    """The skeleton recall term summed slab by slab: the same loss and gradients as the whole volume."""
    params = init_params(CFG, jax.random.key(4))
    batch = _batch(1, seed=2)
    rng = np.random.default_rng(3)
    batch["skeleton"] = jnp.asarray((rng.uniform(size=batch["labels"].shape) < 0.2).astype(np.uint8))
    loss = LossConfig("ce+dice", "balanced", skeleton_classes=(1, 2), skeleton_weight=2.0)
    tx = train.make_optimizer(_frozen(params, ()), LR)
    out = {}
    for slab in (0, 8):
        step = train.make_train_step(CFG, loss, tx, slab_rows=slab)
        _, out[slab] = _compiled(step, train.init_state(params, tx), batch, jax.random.key(1))
    for name in ("loss", "skeleton_loss", "grad_norm"):
        np.testing.assert_allclose(out[8][name], out[0][name], rtol=1e-5, err_msg=name)
    assert 0 < float(out[0]["skeleton_loss"]) < 1
    ev = {s: _compiled(train.make_eval_step(CFG, loss, slab_rows=s), params, batch) for s in (0, 16)}
    np.testing.assert_allclose(ev[16]["skeleton_loss"], ev[0]["skeleton_loss"], rtol=1e-5)
