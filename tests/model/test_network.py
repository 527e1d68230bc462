"""The network: shapes, parameter count, input checks, train-only dropout, determinism, strided ops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from tolerances import assert_close_to_scale

from cerebrum_jax.model import network as model

SMALL = model.ModelConfig(n_filters=2, n_classes=3)
# Compiled once per (config, shape): much faster than op-by-op execution of the whole network.
apply = jax.jit(model.apply, static_argnames=("config", "train"))
init = jax.jit(model.init_params, static_argnums=(0, 2))


@pytest.fixture(scope="module")
def params(tiny_params):
    """Parameters of SMALL; dropout has no parameters, so they serve every 2-filter 3-class config."""
    return tiny_params


def expected_param_count(f: int, n: int) -> int:
    """Sum of k^3 * in * out + out over the layer table (docs/DESIGN.md), written out by hand."""
    layers = [  # (kernel, in, out)
        (3, 1, f), (4, f, 2 * f), (3, 2 * f, 2 * f), (3, 2 * f, 2 * f), (2, 2 * f, 4 * f),
        (3, 4 * f, 4 * f), (3, 4 * f, 4 * f), (3, 4 * f, 4 * f), (2, 4 * f, 2 * f),
        (3, 2 * f, 2 * f), (3, 2 * f, 2 * f), (4, 2 * f, f), (3, f, f), (1, f, n),
    ]  # fmt: skip
    return sum(k**3 * cin * cout + cout for k, cin, cout in layers)


def test_published_parameter_count():
    # eval_shape: the shapes init_params would produce, without running the 24-filter network.
    params = jax.eval_shape(lambda k: model.init_params(model.ModelConfig(), k), jax.random.key(0))
    assert model.count_params(params) == 1_233_631
    assert set(params) == set(model.LAYER_NAMES)


@pytest.mark.parametrize("f,n", [(2, 3), (4, 8), (24, 7), (16, 2)])
def test_parameter_count_and_shapes(f, n):
    config = model.ModelConfig(n_filters=f, n_classes=n)
    params = jax.eval_shape(lambda k: model.init_params(config, k), jax.random.key(0))
    assert sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params)) == expected_param_count(f, n)
    for name, shapes in config.param_shapes().items():
        assert params[name]["kernel"].shape == shapes["kernel"]
        assert params[name]["bias"].shape == shapes["bias"]


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(1, 8, 8, 8, 1), (2, 16, 8, 24, 1), (1, 8, 16, 8, 1)])
def test_output_shape_and_probabilities(params, shape):
    x = jax.random.normal(jax.random.key(2), shape)
    logits = apply(params, SMALL, x)
    assert logits.shape == (*shape[:4], SMALL.n_classes) and logits.dtype == jnp.float32
    probs = jax.nn.softmax(logits, axis=-1)
    np.testing.assert_allclose(np.asarray(probs.sum(-1)), 1.0, atol=1e-5)


@pytest.mark.parametrize(
    "shape,message",
    [
        ((1, 12, 8, 8, 1), "multiples of 8"),
        ((1, 8, 8, 20, 1), "multiples of 8"),
        ((1, 8, 8, 8, 2), "1 channel"),
        ((8, 8, 8, 1), "5-D"),
        ((1, 0, 8, 8, 1), "multiples of 8"),
    ],
)
def test_bad_input_shapes_raise(params, shape, message):
    with pytest.raises(ValueError, match=message):
        apply(params, SMALL, jnp.zeros(shape))


@pytest.mark.slow
def test_dropout_only_in_train_mode(params):
    config = model.ModelConfig(n_filters=2, n_classes=3, dropout_rate=0.5)
    x = jax.random.normal(jax.random.key(3), (1, 8, 16, 8, 1))
    infer = [apply(params, config, x, train=False) for _ in range(2)]
    np.testing.assert_array_equal(infer[0], infer[1])
    a = apply(params, config, x, train=True, key=jax.random.key(4))
    b = apply(params, config, x, train=True, key=jax.random.key(5))
    assert not np.allclose(a, b) and not np.allclose(a, infer[0])
    # Same key, same dropout mask.
    np.testing.assert_array_equal(a, apply(params, config, x, train=True, key=jax.random.key(4)))
    # Without dropout, training and inference agree.
    plain = model.ModelConfig(n_filters=2, n_classes=3, dropout_rate=0.0)
    t = apply(params, plain, x, train=True, key=jax.random.key(4))
    np.testing.assert_allclose(t, apply(params, plain, x), atol=1e-6)


@pytest.mark.slow
def test_init_is_deterministic_per_key():
    p1, p2 = (init(SMALL, jax.random.key(7)) for _ in range(2))
    jax.tree_util.tree_map(np.testing.assert_array_equal, p1, p2)
    p3 = init(SMALL, jax.random.key(8))
    assert not np.allclose(p1["main_output"]["kernel"], p3["main_output"]["kernel"])


@pytest.mark.parametrize(
    ("shape", "in_axis", "out_axis"),
    [
        ((3, 3, 3, 24, 24), -2, -1),  # a 3x3x3 conv
        ((1, 1, 1, 24, 3), -2, -1),  # the head: 72 values, far below the drawn length
        ((4, 4, 4, 96, 48), -1, -2),  # a transposed conv: Keras keeps (out, in) as the last axes
        ((3, 3, 3, 128, 128), -2, -1),  # 442,368 values: more than 2^18, a longer draw
    ],
)
def test_glorot_normal_equals_flax_bit_for_bit(shape, in_axis, out_axis):
    key = jax.random.key(7)
    ours = model.glorot_normal(in_axis=in_axis, out_axis=out_axis)(key, shape)
    flax = nn.initializers.glorot_normal(in_axis=in_axis, out_axis=out_axis)(key, shape, jnp.float32)
    assert ours.shape == shape and ours.dtype == jnp.float32
    # the same random bits; the erf-inverse of them within a few ulps (YNNPACK's vectorised elementwise
    # kernels, cerebrum_jax.runtime, round an element by its place in the buffer): 4 ulps of float32 of
    # the values' scale (erf-inverse near 0 is the largest relative error)
    ulps = 4 * np.finfo(np.float32).eps
    flax = np.asarray(flax)
    np.testing.assert_allclose(np.asarray(ours), flax, rtol=ulps, atol=ulps * float(np.max(np.abs(flax))))


def test_init_values_do_not_depend_on_the_init_shape():
    """init runs no convolution (the parameter shapes come from the layer table), so its input shape is
    a formality: any gives the same parameters."""
    config = model.ModelConfig(n_filters=2, n_classes=3)
    a = model.init_params(config, jax.random.key(3))
    b = model.init_params(config, jax.random.key(3), shape=(16, 8, 24))
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


@pytest.mark.slow
@pytest.mark.parametrize("s,cin,cout", [(2, 3, 4), (4, 2, 5)])
def test_strided_conv_matches_lax(s, cin, cout):
    k1, k2, k3 = jax.random.split(jax.random.key(9), 3)
    x = jax.random.normal(k1, (2, 8, 16, 8, cin))
    kernel = jax.random.normal(k2, (s, s, s, cin, cout))
    bias = jax.random.normal(k3, (cout,))
    ref = jax.lax.conv_general_dilated(
        x, kernel, (s, s, s), "VALID", dimension_numbers=("NDHWC", "DHWIO", "NDHWC")
    )
    # sums of s^3 cin products of N(0, 1) values: float rounding relative to the output's scale
    assert_close_to_scale(model.strided_conv(x, kernel, bias), ref + bias, 1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("s,cin,cout", [(2, 3, 4), (4, 2, 5)])
def test_strided_conv_transpose_matches_definition(s, cin, cout):
    """out[s*i + a, s*j + b, s*l + c] = sum_ch x[i, j, l, ch] * K[a, b, c, :, ch] + bias (Keras's
    Conv3DTranspose: no spatial flip)."""
    k1, k2, k3 = jax.random.split(jax.random.key(10), 3)
    x = np.asarray(jax.random.normal(k1, (1, 2, 3, 2, cin)))
    kernel = np.asarray(jax.random.normal(k2, (s, s, s, cout, cin)))
    bias = np.asarray(jax.random.normal(k3, (cout,)))
    ref = np.zeros((1, 2 * s, 3 * s, 2 * s, cout))
    for i, j, m in np.ndindex(2, 3, 2):
        for a, b, c in np.ndindex(s, s, s):
            ref[0, s * i + a, s * j + b, s * m + c] = kernel[a, b, c] @ x[0, i, j, m] + bias
    assert_close_to_scale(model.strided_conv_transpose(x, kernel, bias), ref, 1e-5)  # the output's scale


def _intermediates(params, config, x, key):
    """Outputs of every submodule (conv layers and Dropouts '<layer>_dr') in a training-mode pass."""
    _, state = model.Cerebrum7T(config).apply(
        {"params": params}, x, train=True, rngs={"dropout": key}, capture_intermediates=True
    )
    return {
        name: np.asarray(v["__call__"][0]) for name, v in state["intermediates"].items() if name != "__call__"
    }


@pytest.mark.slow
def test_dropout_placement_follows_the_original(params):
    """The original's Dropout after down_1to2_conv has the level-1 rate (0); the one after up_2to1_conv
    the level-2 rate: the original model_definition.py's '<layer>_dr' naming."""
    config = model.ModelConfig(n_filters=2, n_classes=3, dropout_rate=0.5)
    x = jax.random.normal(jax.random.key(3), (1, 8, 16, 8, 1))
    a, b = (_intermediates(params, config, x, jax.random.key(k)) for k in (4, 5))
    no_dropout = {"enc_lvl1_block1_conv", "down_1to2_conv", "dec_lvl1_block1_conv", "main_output"}
    expected = {n.removesuffix("_conv") + "_dr" for n in model.LAYER_NAMES if n not in no_dropout}
    assert {n for n in a if n.endswith("_dr")} == expected
    assert "up_2to1_dr" in expected and "down_1to2_dr" not in expected
    assert model.dropout_rate("down_1to2_conv", config) == 0.0
    assert model.dropout_rate("up_2to1_conv", config) == 0.5
    # Behaviour: what enc_lvl2_block1_conv sees (down_1to2's output) does not depend on the dropout key...
    for name in ("enc_lvl1_block1_conv", "down_1to2_conv", "enc_lvl2_block1_conv"):
        np.testing.assert_array_equal(a[name], b[name])
    # ...while up_2to1's output is dropped out (zeros where the conv was not, scaled by 1 / (1 - rate)).
    up, dropped = a["up_2to1_conv"], a["up_2to1_dr"]
    kept, nonzero = dropped != 0, up != 0
    assert nonzero.sum() > 100 and 0.3 < kept[nonzero].mean() < 0.7
    np.testing.assert_allclose(dropped[kept], up[kept] / 0.5, rtol=1e-6)
    assert not np.array_equal(a["up_2to1_dr"], b["up_2to1_dr"])


@pytest.mark.slow
def test_package_exports_and_cheap_import():
    """The research API at package level; the heavy modules load only when one of their names is used."""
    import subprocess
    import sys

    import cerebrum_jax
    import cerebrum_jax.predict.segment  # noqa: F401  (the subpackages imported first shadow no API name)
    from cerebrum_jax.evaluation import metrics
    from cerebrum_jax.model import checkpoint
    from cerebrum_jax.train import augment, losses
    from cerebrum_jax.train import steps as train

    for name in cerebrum_jax.__all__:
        assert getattr(cerebrum_jax, name) is not None, name
        assert not isinstance(getattr(cerebrum_jax, name), type(cerebrum_jax)), (
            f"{name} is a module"
        )  # a function
    assert (
        cerebrum_jax.loss_terms is losses.loss_terms and cerebrum_jax.augment_batch is augment.augment_batch
    )
    assert cerebrum_jax.make_train_step is train.make_train_step and cerebrum_jax.evaluate is metrics.evaluate
    assert cerebrum_jax.load_checkpoint is checkpoint.load_checkpoint
    assert set(cerebrum_jax.__all__) <= set(dir(cerebrum_jax))
    code = (
        "import sys, cerebrum_jax; "
        "print(sorted(m for m in ('optax', 'orbax', 'matplotlib', 'nilearn', 'scipy.spatial', 'tqdm') "
        "if m in sys.modules))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]", r.stdout


@pytest.mark.slow
@pytest.mark.parametrize("cout", [4, model.FOLD_DEPTH_TAPS_BELOW])  # the folded form, the k 2-D convolutions
def test_conv3d_depth_taps_matches_lax(cout):
    """'valid' along D, 'same' along H and W, as 2-D convolutions: one over the depth taps' channels side by
    side below FOLD_DEPTH_TAPS_BELOW output channels, a sum of k of them from there on."""
    k1, k2 = jax.random.split(jax.random.key(15))
    x = jax.random.normal(k1, (2, 7, 6, 5, 3))
    kernel = jax.random.normal(k2, (3, 3, 3, 3, cout))
    dn = ("NDHWC", "DHWIO", "NDHWC")
    ref = jax.lax.conv_general_dilated(x, kernel, (1, 1, 1), [(0, 0), (1, 1), (1, 1)], dimension_numbers=dn)
    out = model.conv3d_depth_taps(x, kernel)
    assert out.shape == (2, 5, 6, 5, cout)
    # sums of 81 products of N(0, 1) values: float rounding relative to the output's scale
    assert_close_to_scale(out, ref, 1e-5)


def _mix32_numpy(h):
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x7FEB352D)
    h = h ^ (h >> np.uint32(15))
    h = h * np.uint32(0x846CA68B)
    return h ^ (h >> np.uint32(16))


def test_dropout_mask_is_the_hash_of_each_elements_index():
    """model.dropout against a numpy computation of the same hash (uint32 arithmetic, wrapping)."""
    y = jax.random.normal(jax.random.key(0), (2, 5, 4, 3, 6)) + 3.0  # no zeros: the mask is y != 0
    key, rate = jax.random.key(9), 0.3
    out = np.asarray(jax.jit(lambda v: model.dropout(v, key, rate))(y))
    k0, k1 = np.asarray(jax.random.key_data(key)).ravel().astype(np.uint32)
    with np.errstate(over="ignore"):
        idx = np.arange(y.size, dtype=np.uint32).reshape(y.shape)
        bits = _mix32_numpy(_mix32_numpy(idx ^ k0) ^ k1)
    keep = bits < np.uint32(int(0.7 * 2**32))
    np.testing.assert_array_equal(out != 0, keep)
    np.testing.assert_allclose(out[keep], np.asarray(y)[keep] / 0.7, rtol=1e-6)


def test_dropout_keeps_1_minus_rate_and_a_slab_gets_its_rows_of_the_whole():
    y = jnp.ones((1, 40, 16, 16, 8))
    key = jax.random.key(1)
    whole = np.asarray(model.dropout(y, key, 0.1))
    kept = (whole != 0).mean()
    assert abs(kept - 0.9) < 4 * np.sqrt(0.09 / whole.size)  # 4 standard deviations of the fraction
    slab = np.asarray(model.dropout(y[:, 12:20], key, 0.1, depth=40, row0=12))
    np.testing.assert_array_equal(slab, whole[:, 12:20])
    other = np.asarray(model.dropout(y, jax.random.key(2), 0.1))
    assert 0.1 < ((other != 0) != (whole != 0)).mean() < 0.3  # another key, another mask (~2 p (1 - p))


def test_relu_keeps_nan_and_has_jax_nn_relus_derivative():
    """Under YNNPACK's elementwise kernels (the command's default) max(NaN, 0) is 0; ours stays NaN."""
    x = jnp.tile(jnp.array([jnp.nan, -jnp.inf, jnp.inf, -2.0, 0.0, 3.0], jnp.float32), 4096)
    got = np.asarray(jax.jit(model.relu)(x))[:6]
    np.testing.assert_array_equal(got, [np.nan, 0.0, np.inf, 0.0, 0.0, 3.0])
    finite = jnp.array([-2.0, 0.0, 3.0])
    grads = jax.vmap(jax.grad(model.relu))(finite)
    np.testing.assert_array_equal(grads, jax.vmap(jax.grad(jax.nn.relu))(finite))
