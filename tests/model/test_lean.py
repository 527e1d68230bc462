"""lean.probabilities_lean (depth slabs, 2-D convolutions) equals model.probabilities, borders included."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cerebrum_jax.model import lean
from cerebrum_jax.model import network as model

init = jax.jit(model.init_params, static_argnums=(0, 2))

lean_jit = jax.jit(lean.probabilities_lean, static_argnames=("config", "slab"))
probabilities = jax.jit(model.probabilities, static_argnames=("config",))


def lean_params(config: model.ModelConfig) -> dict:
    """Glorot kernels and random (non-zero) biases: zero biases would hide a wrong halo at the borders."""
    p = init(config, jax.random.key(11))
    keys = iter(jax.random.split(jax.random.key(12), len(p)))
    return {
        name: {"kernel": v["kernel"], "bias": 0.3 * jax.random.normal(next(keys), v["bias"].shape)}
        for name, v in p.items()
    }


@pytest.mark.parametrize(
    "acts,n_classes", [(("relu", "relu"), 3), (("elu", "tanh"), 7)], ids=["relu-3", "elu-tanh-7"]
)
@pytest.mark.parametrize(
    "shape,slab",
    [
        ((1, 32, 16, 24), 8),
        ((1, 32, 16, 24), 16),
        ((1, 32, 16, 24), 24),  # 32 = 24 + 8: the last slab overlaps the first
        ((1, 32, 16, 24), 64),  # one slab (slab > D is cut to D)
        ((2, 40, 8, 16), 16),  # batch 2; 40 = 2 * 16 + 8
    ],
)
@pytest.mark.slow
def test_lean_forward_equals_probabilities(acts, n_classes, shape, slab):
    config = model.ModelConfig(
        n_filters=4, n_classes=n_classes, enc_activation=acts[0], dec_activation=acts[1]
    )
    params = lean_params(config)
    x = jax.random.normal(jax.random.key(13), (*shape, 1))
    ref = np.asarray(probabilities(params, config, x))
    out = np.asarray(lean_jit(params, config, x, slab=slab))
    assert out.shape == ref.shape and out.dtype == np.float32
    assert ref.std() > 0.05  # probabilities that vary, so the comparison means something
    np.testing.assert_allclose(out, ref, atol=1e-5)


@pytest.mark.slow
def test_lean_forward_bf16_and_bad_slab():
    config = model.ModelConfig(n_filters=4, n_classes=3, compute_dtype="bfloat16")
    params = lean_params(config)
    x = jax.random.normal(jax.random.key(14), (1, 16, 8, 16, 1))
    out = np.asarray(lean_jit(params, config, x, slab=8))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(out, probabilities(params, config, x), atol=0.05)
    for slab in (0, 12):
        with pytest.raises(ValueError, match="multiple of 8"):
            lean.probabilities_lean(params, config, x, slab=slab)
    with pytest.raises(ValueError, match="multiples of 8"):
        lean.probabilities_lean(params, config, jnp.zeros((1, 12, 8, 8, 1)))
