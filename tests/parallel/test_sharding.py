"""Sharded forward / train step vs single device, per-device memory, remat and bf16 (CPU, 4 virtual devices).

conftest.py sets XLA_FLAGS=--xla_force_host_platform_device_count=4; the 8-device case runs in a
subprocess with its own XLA_FLAGS.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tolerances import adam_mu, assert_close_to_scale, assert_first_updates_close, assert_leaves_close

from cerebrum_jax.cli import options
from cerebrum_jax.model import network as M
from cerebrum_jax.parallel import sharding as S
from cerebrum_jax.predict import predictor

CFG = M.ModelConfig(n_filters=2, n_classes=3, dropout_rate=0.0)
SHAPE = (32, 16, 16)


def _params(cfg=CFG):
    return M.init_params(cfg, jax.random.PRNGKey(0))


def _batch(b: int = 1, shape=SHAPE, n_classes: int = 3) -> dict:
    k1, k2 = jax.random.split(jax.random.PRNGKey(1))
    return {
        "image": jax.random.normal(k1, (b, *shape, 1), jnp.float32),
        "labels": jax.random.randint(k2, (b, *shape), 0, n_classes, jnp.int32),
        "class_weights": jnp.linspace(0.5, 1.5, n_classes, dtype=jnp.float32),
    }


def _local_train_step(cfg: M.ModelConfig, tx):
    """A pure step with the train.py contract: weighted cross-entropy + optax update."""

    def step(state, batch, key):
        def loss_fn(params):
            logits = M.apply(params, cfg, batch["image"], train=True, key=key)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
            w = batch["class_weights"][batch["labels"]]
            return jnp.sum(ce * w) / jnp.sum(w)

        loss, grads = jax.value_and_grad(loss_fn)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, {"loss": loss}

    return step


def _state(cfg, tx):
    params = _params(cfg)
    return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}


def _mesh(spec: str):
    data, space = (int(s) for s in spec.split("x"))
    return S.make_mesh(spec, jax.devices()[: data * space])


@pytest.mark.parametrize(
    ("spec", "expect"),
    [(None, (1, 4)), ("", (1, 4)), ("1x4", (1, 4)), ("2x2", (2, 2)), ("4X1", (4, 1))],
)
def test_parse_mesh_spec(spec, expect):
    assert S.parse_mesh_spec(spec, 4) == expect
    mesh = S.make_mesh(spec)
    assert (mesh.shape["data"], mesh.shape["space"]) == expect


@pytest.mark.parametrize("spec", ["3x1", "1x8", "x4", "1x", "axb", "1x2x2", "0x4"])
def test_bad_mesh_spec(spec):
    with pytest.raises(ValueError):
        S.make_mesh(spec)


@pytest.mark.parametrize(("shape", "spec"), [((1, 16, 8, 8, 1), "1x4"), ((1, 32, 8, 8, 1), "2x2")])
def test_check_divisible_rejects(shape, spec):
    with pytest.raises(ValueError):
        S.check_divisible(shape, _mesh(spec))


@pytest.mark.slow
@pytest.mark.parametrize(("spec", "b"), [("1x1", 1), ("1x2", 1), ("1x4", 1), ("2x2", 2), ("4x1", 4)])
def test_sharded_forward_equals_single_device(spec, b):
    params, x = _params(), _batch(b)["image"]
    ref = M.probabilities(params, CFG, x)
    mesh = _mesh(spec)
    y = predictor.forward(params, CFG, x, mesh)
    assert y.shape == (b, *SHAPE, CFG.n_classes)
    assert y.sharding.is_equivalent_to(S.volume_sharding(mesh), y.ndim)
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(("spec", "b"), [("1x2", 1), ("1x4", 1), ("2x2", 2)])
def test_sharded_train_step_equals_single_device(spec, b):
    """The first step's loss, gradients (Adam's first moment, 0.1 g) and update equal one device's to
    float rounding: gradients leafwise at 1e-5 of each leaf's scale, the update within what that allows
    Adam's first update (lr g / (|g| + eps), ill-conditioned near g = 0: tolerances.adam_update_bound)."""
    lr, rtol = 1e-3, 1e-5
    tx = optax.adam(lr)
    step = _local_train_step(CFG, tx)
    batch, key = _batch(b), jax.random.PRNGKey(3)
    params = jax.tree_util.tree_map(np.asarray, _params())
    ref_state, ref_metrics = jax.tree_util.tree_map(np.asarray, jax.jit(step)(_state(CFG, tx), batch, key))
    ref_mu = adam_mu(ref_state["opt_state"])
    mesh = _mesh(spec)
    state = jax.device_put(_state(CFG, tx), S.replicated(mesh))
    jitted = S.jit_train_step(step, mesh, state=state, batch=batch)

    def update(p):
        return jax.tree_util.tree_map(lambda new, old: np.asarray(new, np.float64) - old, p, params)

    for _ in range(2):  # the second call reuses the donated, re-sharded state
        state, metrics = jitted(state, S.put_batch(batch, mesh), key)
        if _ == 0:
            np.testing.assert_allclose(float(metrics["loss"]), float(ref_metrics["loss"]), rtol=rtol)
            assert_leaves_close(ref_mu, adam_mu(state["opt_state"]), rtol)
            ours, ref = update(state["params"]), update(ref_state["params"])
            assert_first_updates_close(ref_mu, ref_state["params"], ours, ref, rtol, lr)
    assert int(state["step"]) == 2


def _temp_bytes(compiled) -> int:
    ma = compiled.memory_analysis()
    return ma.temp_size_in_bytes + ma.argument_size_in_bytes + ma.output_size_in_bytes


@pytest.mark.slow
def test_forward_memory_per_device_falls_with_devices():
    params, x = _params(), _batch()["image"]
    specs = ("1x1", "1x2", "1x4")
    sizes = [_temp_bytes(predictor.forward_fn(CFG, _mesh(spec)).lower(params, x).compile()) for spec in specs]
    assert sizes[0] > sizes[1] > sizes[2], sizes


def _train_memory(cfg, spec) -> int:
    tx = optax.adam(1e-3)
    mesh = _mesh(spec)
    batch = _batch()
    state = _state(cfg, tx)
    jitted = S.jit_train_step(_local_train_step(cfg, tx), mesh, state=state, batch=batch)
    return _temp_bytes(jitted.lower(state, batch, jax.random.PRNGKey(0)).compile())


@pytest.mark.slow
def test_train_memory_per_device_falls_with_devices():
    sizes = [_train_memory(CFG, spec) for spec in ("1x1", "1x2", "1x4")]
    assert sizes[0] > sizes[1] > sizes[2], sizes


@pytest.mark.slow
def test_remat_same_results_and_no_more_memory():
    """Remat must not change loss or gradients, and must not raise the compiled footprint much.

    XLA:CPU merges most of the recomputation with the forward copy (common-subexpression elimination after
    the optimisation barriers are expanded): the footprint was equal, and is 7-15 % larger since the
    kernel gradient's and up_2to1_conv's custom gradients (their residuals are kept apart); remat is for
    GPUs (README). A remat that kept a second copy of the activations would be ~2x. The lowered program
    must still carry the recomputation (optimization barriers) for the GPU compiler.
    """
    remat = dataclasses.replace(CFG, remat=True)
    params, batch, key = _params(), _batch(), jax.random.PRNGKey(4)

    def loss(p, cfg):
        logits = M.apply(p, cfg, batch["image"], train=True, key=key)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()

    grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    (l0, g0), (l1, g1) = grad(params, CFG), grad(params, remat)
    # two programs (the remat one recomputes the forward in the backward pass): the same values up to
    # XLA's float rounding, which it may schedule differently in each: a few ulp of the loss (a mean of
    # 8192 cross-entropies), each gradient leaf at 1e-5 of its own scale
    assert float(l1) == pytest.approx(float(l0), rel=1e-6)
    assert_leaves_close(g0, g1, 1e-5)
    assert "optimization_barrier" in grad.lower(params, remat).as_text()
    assert "optimization_barrier" not in grad.lower(params, CFG).as_text()
    assert _train_memory(remat, "1x1") <= 1.2 * _train_memory(CFG, "1x1")


@pytest.mark.slow
def test_bf16_runs_and_is_close():
    bf16 = dataclasses.replace(CFG, compute_dtype="bfloat16")
    params, x = _params(), _batch()["image"]
    ref = M.probabilities(params, CFG, x)
    y = predictor.forward(params, bf16, x, _mesh("1x4"))
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y).sum(-1), 1.0, atol=1e-5)  # float32 softmax
    assert float(jnp.max(jnp.abs(y - ref))) < 5e-2
    # bf16 train step: float32 params and optimizer state survive the update
    tx = optax.adam(1e-3)
    state, metrics = jax.jit(_local_train_step(bf16, tx))(_state(bf16, tx), _batch(), jax.random.PRNGKey(0))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(state["params"]))
    assert np.isfinite(float(metrics["loss"]))


@pytest.mark.parametrize(
    ("argv", "remat", "dtype", "mesh"),
    [
        ([], False, "float32", (1, 4)),
        (["--remat", "--precision", "bf16", "--mesh", "2x2"], True, "bfloat16", (2, 2)),
        (["--precision", "float32", "--mesh", "4x1"], False, "float32", (4, 1)),
    ],
)
def test_performance_args(argv, remat, dtype, mesh):
    parser = argparse.ArgumentParser()
    options.add_performance_args(parser)
    cfg, m = options.performance_options(parser.parse_args(argv), CFG)
    assert (cfg.remat, cfg.compute_dtype, (m.shape["data"], m.shape["space"])) == (remat, dtype, mesh)


@pytest.mark.slow
def test_eight_devices_subprocess():
    code = textwrap.dedent(
        """
        import jax, jax.numpy as jnp, numpy as np
        from cerebrum_jax.model import network as M
        from cerebrum_jax.parallel import sharding as S
        from cerebrum_jax.predict import predictor
        assert len(jax.devices()) == 8
        cfg = M.ModelConfig(n_filters=2, n_classes=3)
        p = M.init_params(cfg, jax.random.PRNGKey(0))
        x = jax.random.normal(jax.random.PRNGKey(1), (2, 64, 8, 8, 1))
        ref = M.probabilities(p, cfg, x)
        for spec in ("1x8", "2x4"):
            y = predictor.forward(p, cfg, x, S.make_mesh(spec))
            print(spec, float(jnp.max(jnp.abs(y - ref))))
        """
    )
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    diffs = dict(line.split() for line in out.stdout.strip().splitlines())
    assert set(diffs) == {"1x8", "2x4"}
    assert all(float(d) < 1e-5 for d in diffs.values()), diffs


@pytest.mark.slow
@pytest.mark.parametrize(("b", "d", "h", "w", "cin", "cout"), [(1, 8, 8, 8, 1, 3), (2, 8, 16, 8, 4, 2)])
def test_conv_kernel_gradient_matches_xla(b, d, h, w, cin, cout):
    """model.conv3d_same's matmul kernel gradient (a speed change) equals XLA's convolution gradient."""
    kx, kk, kg = jax.random.split(jax.random.PRNGKey(b * d + cin), 3)
    x = jax.random.normal(kx, (b, d, h, w, cin))
    kernel = jax.random.normal(kk, (3, 3, 3, cin, cout))
    g = jax.random.normal(kg, (b, d, h, w, cout))
    ours = jax.vjp(lambda v, k: M.conv3d_same(v, k, jnp.zeros(cout)), x, kernel)[1](g)
    ref = jax.vjp(M._conv_same, x, kernel)[1](g)
    for a, r in zip(ours, ref, strict=True):
        np.testing.assert_allclose(
            np.asarray(a), np.asarray(r), rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(r)))
        )


@pytest.mark.slow
@pytest.mark.parametrize("limit", [8 * 8 * 3, 8 * 8 * 3 * 4, 1 << 26])
def test_conv_depth_chunks_equal_one_conv(limit, monkeypatch):
    """Large convolutions run in D-slabs (XLA:CPU aborts on a whole volume); slabs change nothing."""
    monkeypatch.setattr(M, "CONV_CHUNK_ELEMENTS", limit)
    kx, kk = jax.random.split(jax.random.PRNGKey(limit))
    x = jax.random.normal(kx, (1, 16, 8, 8, 3))
    kernel = jax.random.normal(kk, (3, 3, 3, 3, 4))
    assert 16 % M._conv_depth_chunk(x.shape, 3) == 0
    ref = jax.lax.conv_general_dilated(
        x, kernel, (1, 1, 1), "SAME", dimension_numbers=("NDHWC", "DHWIO", "NDHWC")
    )
    # sums of 81 products of N(0, 1) values (outputs up to ~30): float rounding relative to the output's
    # scale, 1e-5 of max|ref| as the gradients below (an absolute 1e-5 is a few ulp of 30)
    assert_close_to_scale(M._conv_same(x, kernel), ref, 1e-5)
    grads = jax.grad(lambda v, k: jnp.sum(M.conv3d_same(v, k, jnp.zeros(4)) ** 2), (0, 1))(x, kernel)
    refs = jax.grad(
        lambda v, k: jnp.sum(
            jax.lax.conv_general_dilated(
                v, k, (1, 1, 1), "SAME", dimension_numbers=("NDHWC", "DHWIO", "NDHWC")
            )
            ** 2
        ),
        (0, 1),
    )(x, kernel)
    for a, r in zip(grads, refs, strict=True):
        assert_close_to_scale(a, r, 1e-5)
