"""The CEREBRUM-7T network (ThreeLevelsConvUNetStridedConv) as a pure Flax linen module.

Axis convention everywhere in cerebrum_jax: (batch, D, H, W, C), channels last, float32 unless
``ModelConfig.compute_dtype`` says otherwise. Parameter names are the Keras layer names of the
original (see ``LAYERS``), so a checkpoint reads like the published ``model_trained.h5``.

The four layers whose kernel equals their stride (``down_1to2_conv``, ``down_2to3_conv``,
``up_3to2_conv``, ``up_2to1_conv``) are non-overlapping, so they are computed exactly as a
space-to-depth (or depth-to-space) reshape plus one matrix product. XLA lowers a strided
transposed convolution as an input-dilated convolution that multiplies mostly zeros; the reshape
form does only the useful work.

``lean.probabilities_lean`` is the inference forward for CPUs (full-resolution layers in depth slabs, 3x3x3
convolutions as 2-D ones), built from this module's layers.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

from cerebrum_jax.model.spec import (  # noqa: F401  (the layer table and ModelConfig, also read from here)
    DIVISOR,
    LAYER_NAMES,
    LAYERS,
    LEVEL1_DROPOUT,
    Layer,
    ModelConfig,
    check_input,
    dropout_rate,
)


def relu(x: jax.Array) -> jax.Array:
    """max(x, 0) with NaN kept NaN, and derivative 0 at 0 (as ``jax.nn.relu``). Written as a select:
    YNNPACK's elementwise max (``runtime.CPU_XLA_FLAGS``) returns 0 for NaN, which would hide a diverged
    network from the non-finite-loss check."""
    return jnp.where((x > 0) | jnp.isnan(x), x, jnp.zeros((), x.dtype))


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": relu,
    "elu": jax.nn.elu,
    "selu": jax.nn.selu,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "linear": lambda x: x,
}


# ---------------------------------------------------------------------------------------------
# Pure operations
# ---------------------------------------------------------------------------------------------


def space_to_depth(x: jax.Array, s: int) -> jax.Array:
    """(B, D, H, W, C) -> (B, D/s, H/s, W/s, s*s*s*C); the block offsets (a, b, c) vary slowest."""
    b, d, h, w, c = x.shape
    x = x.reshape(b, d // s, s, h // s, s, w // s, s, c)
    x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(b, d // s, h // s, w // s, s * s * s * c)


def depth_to_space(x: jax.Array, s: int) -> jax.Array:
    """Inverse of ``space_to_depth``: (B, D, H, W, s*s*s*C) -> (B, D*s, H*s, W*s, C)."""
    b, d, h, w, sc = x.shape
    c = sc // (s * s * s)
    x = x.reshape(b, d, h, w, s, s, s, c)
    x = x.transpose(0, 1, 4, 2, 5, 3, 6, 7)
    return x.reshape(b, d * s, h * s, w * s, c)


def strided_conv(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """Conv3D with kernel == stride, 'valid': x (B, D, H, W, Cin), kernel (s, s, s, Cin, Cout)."""
    s, cin, cout = kernel.shape[0], kernel.shape[3], kernel.shape[4]
    y = space_to_depth(x, s) @ kernel.reshape(s * s * s * cin, cout)
    return y + bias


def strided_conv_transpose(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """Keras Conv3DTranspose with kernel == stride s, x (B, D, H, W, Cin), kernel (s, s, s, Cout, Cin).

    out[s*i + a] = sum_c x[i, c] * kernel[a, :, c] + bias per axis (no spatial flip).
    """
    s, cout, cin = kernel.shape[0], kernel.shape[3], kernel.shape[4]
    k = kernel.transpose(4, 0, 1, 2, 3).reshape(cin, s * s * s * cout)
    return _matmul_depth_to_space(x, k, s) + bias


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul_depth_to_space(x: jax.Array, k: jax.Array, s: int) -> jax.Array:
    """``depth_to_space(x @ k, s)``: x (B, d, h, w, Cin), k (Cin, s^3 Cout) -> (B, s d, s h, s w, Cout).

    Its gradient is written out because XLA:CPU, left to itself, laid the cotangent's space-to-depth out
    channels first for the kernel gradient's product: an 8-D transpose of a full-resolution tensor (92 ms
    of a 0.9 s training step at 64x88x56, the whole layer's forward taking 3 ms)."""
    return depth_to_space(x @ k, s)


def _mds_fwd(x, k, s):
    return depth_to_space(x @ k, s), (x, k)


def _mds_bwd(s, res, g):
    x, k = res
    gs = space_to_depth(g, s).reshape(-1, k.shape[1])  # (voxels of x, s^3 Cout), channels last
    x2 = x.reshape(-1, k.shape[0])
    dk = jnp.dot(x2.T, gs, preferred_element_type=jnp.float32).astype(k.dtype)  # (Cin, voxels) @ (voxels, .)
    dx = jnp.dot(gs, k.T).reshape(x.shape)
    return dx, dk


_matmul_depth_to_space.defvjp(_mds_fwd, _mds_bwd)


CONV_CHUNK_ELEMENTS = 1 << 26  # max input elements (B*d*H*W*Cin) of one XLA convolution call


def _conv_depth_chunk(x_shape: tuple[int, ...], cin: int) -> int:
    """Largest divisor of D whose slab (B, chunk, H, W, Cin) has at most CONV_CHUNK_ELEMENTS elements."""
    b, d, h, w = x_shape[:4]
    per_slice = max(1, b * h * w * cin)
    return max([c for c in range(1, d + 1) if d % c == 0 and c * per_slice <= CONV_CHUNK_ELEMENTS] or [1])


# Below this many output channels ``conv3d_depth_taps`` folds the k depth taps into one 2-D convolution's
# input channels: YNNPACK's 2-D convolutions lose most of their speed on narrow outputs (its kernels are
# 16 float32 lanes wide on AVX-512), and one convolution over k Cin channels spends that loss once, not k
# times. Forward / input gradient of one 56x72x64 layer, 2 cores, Xeon AVX-512 (ms, taps -> folded):
# 12->12 44.7 -> 35.4 / 40.6 -> 29.3, 1->12 19.7 -> 8.3, 8->8 26.8 -> 15.1; at 16 and more output channels
# the folded form loses (16->16 40.2 -> 40.6, 24->24 53 -> 99, 1->24 11 -> 53). The demo's 12-filter
# training step: 252 -> 208 ms.
FOLD_DEPTH_TAPS_BELOW = 16


def conv3d_depth_taps(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Stride-1 conv without bias, 'valid' along D and 'same' along H and W, as 2-D convolutions:
    x (B, d + k - 1, H, W, Cin), kernel (k, k, k, Cin, Cout) odd k -> (B, d, H, W, Cout).

    out[:, i] = sum_a conv2d_same(x[:, i + a], kernel[a]) with the d output rows as the 2-D batch: k 2-D
    convolutions, or, below ``FOLD_DEPTH_TAPS_BELOW`` output channels, one over the k rows' channels side
    by side (k Cin). The input carries its own k//2 halo rows along D (neighbouring rows, or zeros at a
    volume border). XLA:CPU runs these 2-D convolutions about 2.5-3x faster than one 3-D convolution of
    the same shapes.
    """
    k = kernel.shape[0]
    r = k // 2
    b, rows, h, w, cin = x.shape
    d = rows - (k - 1)
    dn = ("NHWC", "HWIO", "NHWC")
    pad = [(r, r), (r, r)]
    if kernel.shape[-1] < FOLD_DEPTH_TAPS_BELOW:
        xa = jnp.concatenate([x[:, a : a + d] for a in range(k)], axis=-1).reshape(b * d, h, w, k * cin)
        folded = jnp.transpose(kernel, (1, 2, 0, 3, 4)).reshape(k, k, k * cin, kernel.shape[-1])  # (a, i)
        out = jax.lax.conv_general_dilated(xa, folded, (1, 1), pad, dimension_numbers=dn)
        return out.reshape(b, d, h, w, kernel.shape[-1])
    out = None
    for a in range(k):
        xa = x[:, a : a + d].reshape(b * d, h, w, cin)
        y = jax.lax.conv_general_dilated(xa, kernel[a], (1, 1), pad, dimension_numbers=dn)
        out = y if out is None else out + y
    return out.reshape(b, d, h, w, kernel.shape[-1])


def _conv_same(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """'same' stride-1 conv, x (B, D, H, W, Cin), kernel (k, k, k, Cin, Cout) odd k.

    On XLA:CPU as ``conv3d_depth_taps`` (k 2-D convolutions, 2.5-3x faster than its 3-D convolution), in
    D-slabs of at most CONV_CHUNK_ELEMENTS input elements with k//2 halo rows from a D-padded copy: XLA:CPU
    aborts with std::bad_alloc on one whole 256x352x224x24 convolution. Other backends: one 3-D convolution
    (and GSPMD a plain sharded one).
    """
    if jax.default_backend() != "cpu":
        dn = ("NDHWC", "DHWIO", "NDHWC")
        return jax.lax.conv_general_dilated(x, kernel, (1, 1, 1), "SAME", dimension_numbers=dn)
    chunk = _conv_depth_chunk(x.shape, x.shape[-1])
    r = kernel.shape[0] // 2
    xp = jnp.pad(x, ((0, 0), (r, r), (0, 0), (0, 0), (0, 0)))
    slabs = [conv3d_depth_taps(xp[:, s : s + chunk + 2 * r], kernel) for s in range(0, x.shape[1], chunk)]
    return slabs[0] if len(slabs) == 1 else jnp.concatenate(slabs, axis=1)


@jax.custom_vjp
def _conv_same_fast_grad(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """``_conv_same`` for odd cubic kernels, with a matmul-based kernel gradient (see ``_kernel_grad``)."""
    return _conv_same(x, kernel)


def _conv_fwd(x, kernel):
    return _conv_same(x, kernel), (x, kernel)


def kernel_grad_split(cin: int, cout: int, k: int = 3) -> int:
    """How many of the kernel's axes (counted from W) ``_kernel_grad`` puts on x's side: the split of the
    k^3 taps whose copies (k^s copies of x's Cin channels, k^(3-s) of g's Cout) move the fewest bytes;
    ties go to fewer copies of x."""
    return min(range(4), key=lambda s: (cin * k**s + cout * k ** (3 - s), s))


def _kernel_grad(x, kernel, g, pad_depth: bool = True, low_memory: bool = True, split=None) -> jax.Array:
    """d loss / d kernel (k, k, k, Cin, Cout) of a 'same' conv from its input x and output cotangent g.

    One matrix product over the voxels of the zero-padded grid, instead of XLA:CPU's convolution gradient
    (about 2x the forward's time) or k*k products over im2col copies (XLA:CPU's channel concatenations
    ran at a few GB/s): on the grid flattened to N = B (D + 2r) (H + 2r) (W + 2r) rows, tap (a, b, c)
    pairs input row t + a S1 + b S2 + c with output row t (S1, S2: the plane and row strides), g being
    placed at the top-left of the same grid with zeros after its last row, column and plane (so no tap
    reaches across a row, plane or volume). The taps of the last ``split`` axes (``kernel_grad_split``)
    go side by side on x's side, channels first (k^split Cin, N), the others on g's side (N, k^(3-split)
    Cout): the layouts YNNPACK's dot reads without a transpose. Accumulated in float32.

    ``pad_depth`` False: x already carries its depth halo, (B, d + k - 1, H, W, Cin) for g (B, d, H, W,
    Cout), as the depth slabs of ``streamed`` and ``conv3d_depth_taps`` do. ``low_memory`` (default): the
    d taps one at a time when they are on g's side (a loop: XLA:CPU keeps one tap's copies of g live, not
    k): a third of the memory, and no slower (training step 64x88x56, 24 filters: 0.539 vs 0.541 s; the
    demo's 12 filters: 0.250 vs 0.263 s).
    """
    k, cin, cout = kernel.shape[0], kernel.shape[3], kernel.shape[4]
    b, d, h, w, _ = g.shape
    r, rd = k // 2, (k // 2 if pad_depth else 0)
    strides = ((h + 2 * r) * (w + 2 * r), w + 2 * r, 1)  # of the d, h, w axes on the flattened grid
    n = b * (d + 2 * r) * strides[0]
    split = kernel_grad_split(cin, cout, k) if split is None else split
    loop = low_memory and split < 3  # the d axis on g's side: one d tap at a time
    x_axes, g_axes = range(3 - split, 3), range(1 if loop else 0, 3 - split)
    grid = lambda axes: [sum(t[i] * strides[a] for i, a in enumerate(axes)) for t in _taps(k, len(axes))]  # noqa: E731

    xp = jnp.pad(x, ((0, 0), (rd, rd), (r, r), (r, r), (0, 0))).reshape(n, cin)
    most = sum((k - 1) * s for s in strides)
    xt = jnp.pad(xp.T, ((0, 0), (0, most)))  # (Cin, N + most)
    xw = jnp.concatenate([xt[:, o : o + n] for o in grid(x_axes)], axis=0)  # row (taps, i) at t + offset
    gq = jnp.pad(g, ((0, 0), (0, 2 * r), (0, 2 * r), (0, 2 * r), (0, 0))).reshape(n, cout)
    gp = jnp.pad(gq, ((most, 0), (0, 0)))

    def product(base):  # (k^split Cin, k^(3-split) Cout) of the g-side taps shifted by ``base`` more rows
        if isinstance(base, int):
            cols = [gp[most - base - o : most - base - o + n] for o in grid(g_axes)]
        else:
            cols = [jax.lax.dynamic_slice_in_dim(gp, most - base - o, n, axis=0) for o in grid(g_axes)]
        return jnp.dot(xw, jnp.concatenate(cols, axis=1), preferred_element_type=jnp.float32)

    if loop:
        out = jax.lax.map(lambda a: product(a * strides[0]), jnp.arange(k))  # [a, (x taps, i), (g taps, o)]
        out = out.reshape(k, k**split, cin, k ** (2 - split), cout).transpose(0, 3, 1, 2, 4)
    else:
        out = product(0).reshape(k**split, cin, k ** (3 - split), cout).transpose(2, 0, 1, 3)
    return out.reshape(kernel.shape).astype(kernel.dtype)


def _taps(k: int, n_axes: int) -> list[tuple[int, ...]]:
    """Every tap of ``n_axes`` axes of a k-kernel, the last axis varying fastest."""
    return [tuple(int(v) for v in t) for t in itertools.product(range(k), repeat=n_axes)]


def _conv_bwd(res, g):
    x, kernel = res
    _, input_grad = jax.vjp(lambda v: _conv_same(v, kernel), x)
    return input_grad(g)[0], _kernel_grad(x, kernel, g)


_conv_same_fast_grad.defvjp(_conv_fwd, _conv_bwd)


def conv3d_same(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """Stride-1 Conv3D with Keras 'same' padding: x (B, D, H, W, Cin), kernel (k, k, k, Cin, Cout).

    The matmul kernel gradient (``_kernel_grad``) is XLA:CPU's; other backends differentiate their own
    convolution (cuDNN's kernel gradient needs none of its copies of the cotangent)."""
    if kernel.shape[:3] == (1, 1, 1):
        return x @ kernel[0, 0, 0] + bias
    if jax.default_backend() != "cpu":
        return _conv_same(x, kernel) + bias
    return _conv_same_fast_grad(x, kernel) + bias


OPS = {"conv": conv3d_same, "down": strided_conv, "up": strided_conv_transpose}


# ---------------------------------------------------------------------------------------------
# Flax modules
# ---------------------------------------------------------------------------------------------


TRUNCATED_STD = 0.87962566103423978  # standard deviation of a standard normal truncated to (-2, 2)


def glorot_normal(in_axis: int = -2, out_axis: int = -1) -> Callable:
    """Keras's glorot_normal: the values of ``flax.linen.initializers.glorot_normal`` (a normal truncated
    to 2 standard deviations, variance 2 / (fan_in + fan_out)), but quick to start.

    Flax's compiles its truncated normal once per kernel shape (~2 s each on 2 cores, ~25 s for this
    network); here it is drawn for one fixed length (a power of two, at least 2^18) and cut to the
    kernel: JAX's threefry gives the first n draws of a longer vector equal to the n draws of a vector of
    n, so one compiled program serves every kernel. The random bits are Flax's exactly; the values too up
    to a few float32 ulps of the transcendental functions, which YNNPACK's vectorised elementwise kernels
    (``runtime.CPU_XLA_FLAGS``) round by an element's place in the buffer (``tests/model/test_network.py``).
    """

    def init(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
        n = math.prod(shape)
        receptive = n / shape[in_axis] / shape[out_axis]  # as jax.nn.initializers computes the fans
        denominator = (shape[in_axis] * receptive + shape[out_axis] * receptive) / 2
        stddev = jnp.sqrt(jnp.array(1.0 / denominator, dtype)) / jnp.array(TRUNCATED_STD, dtype)
        draws = jax.random.truncated_normal(key, -2, 2, (max(2**18, 1 << (n - 1).bit_length()),), dtype)
        return draws[:n].reshape(shape) * stddev

    return init


def _mix32(h: jax.Array) -> jax.Array:
    """A 32-bit integer hash (lowbias32: xor-shift-multiply, full avalanche), uint32 -> uint32."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x7FEB352D)
    h = h ^ (h >> 15)
    h = h * jnp.uint32(0x846CA68B)
    return h ^ (h >> 16)


def dropout(y: jax.Array, key: jax.Array, rate: float, depth: int | None = None, row0=0) -> jax.Array:
    """Inverted dropout of y (B, n, H, W, F): each element kept with probability 1 - rate (scaled by
    1 / (1 - rate)) by a hash of ``key`` and its flat index in the (B, depth, H, W, F) tensor whose rows
    row0 .. row0 + n - 1 y holds (default: all of it), so that a depth slab of a tensor gets the mask of
    those rows of the whole (``streamed``). Two rounds of a 32-bit integer hash per element instead of
    JAX's threefry (about 80 integer operations per 32 bits; the full-resolution dropout after
    up_2to1_conv drew 7.6 M of them per training step at 64x88x56)."""
    b, n, h, w, f = y.shape
    depth = n if depth is None else depth
    if b * depth * h * w * f >= 2**32:
        raise ValueError(f"dropout supports tensors under 2**32 elements, not {(b, depth, h, w, f)}")
    k0, k1 = (jax.random.key_data(key).ravel()[i].astype(jnp.uint32) for i in (0, 1))
    plane = jnp.uint32(h * w * f)
    row0 = jnp.asarray(row0).astype(jnp.uint32)  # may be -1 (wraps): rows outside the tensor get garbage
    first = jnp.arange(b, dtype=jnp.uint32)[:, None] * jnp.uint32(depth) + row0
    rows = first + jnp.arange(n, dtype=jnp.uint32)[None, :]  # (B, n): each row's index in the whole tensor
    within = jax.lax.broadcasted_iota(jnp.uint32, (h, w, f), 0) * jnp.uint32(w * f)
    within = within + jax.lax.broadcasted_iota(jnp.uint32, (h, w, f), 1) * jnp.uint32(f)
    within = within + jax.lax.broadcasted_iota(jnp.uint32, (h, w, f), 2)
    idx = rows[:, :, None, None, None] * plane + within
    bits = _mix32(_mix32(idx ^ k0) ^ k1)
    keep = 1.0 - rate
    mask = bits < jnp.uint32(min(int(keep * 2.0**32), 2**32 - 1))
    return jax.lax.select(mask, y / jnp.asarray(keep, y.dtype), jnp.zeros_like(y))


class DropoutKey(nn.Module):
    """The 'dropout' key a module of this name draws (what flax.linen.Dropout would draw in its place)."""

    @nn.compact
    def __call__(self):
        return self.make_rng("dropout")


class HashDropout(nn.Module):
    """``dropout`` as a linen module '<layer>_dr' (the original's Dropout layers), keyed by its 'dropout'
    rng like flax.linen.Dropout; identity when ``deterministic``."""

    rate: float
    deterministic: bool

    @nn.compact
    def __call__(self, y: jax.Array) -> jax.Array:
        if self.deterministic or self.rate == 0:
            return y
        return dropout(y, self.make_rng("dropout"), self.rate)


class KerasLayer(nn.Module):
    """One conv layer of ``LAYERS`` with a Keras-layout ``kernel`` and a ``bias`` parameter."""

    layer: Layer
    in_channels: int
    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = self.config.param_shapes()[self.layer.name]
        # Keras's glorot_normal: truncated normal, variance 2 / (fan_in + fan_out).
        in_axis, out_axis = (-1, -2) if self.layer.op == "up" else (-2, -1)
        init = glorot_normal(in_axis=in_axis, out_axis=out_axis)
        kernel = self.param("kernel", init, shape["kernel"], jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, shape["bias"], jnp.float32)
        if self.is_initializing():
            # Parameters only: their shapes come from the layer table, not from x, and each one's key
            # from its module path, so ``init`` need not run (and compile) any convolution.
            return x
        # The 1x1x1 head stays float32 under bf16 compute: it is cheap and feeds the float32 softmax/loss.
        head = self.layer.activation == "softmax"
        dtype = jnp.dtype("float32" if head else self.config.compute_dtype)
        return OPS[self.layer.op](x.astype(dtype), kernel.astype(dtype), bias.astype(dtype))


class Cerebrum7T(nn.Module):
    """CEREBRUM-7T: (B, D, H, W, 1) float -> (B, D, H, W, n_classes) logits (float32).

    Probabilities are ``jax.nn.softmax(logits, axis=-1)`` (see ``probabilities``); keeping the
    softmax out lets the losses use ``log_softmax`` for stability. Dropout needs a 'dropout' rng
    when ``train=True``.
    """

    config: ModelConfig = ModelConfig()
    # Optional jax.sharding.Sharding for every (B, D, H, W, C) activation (see parallel.sharding):
    # pins the spatial split so XLA keeps activations sharded and exchanges only conv halos.
    act_sharding: object = None

    def _pin(self, y: jax.Array) -> jax.Array:
        if self.act_sharding is None:
            return y
        return jax.lax.with_sharding_constraint(y, self.act_sharding)

    def _layer(self, name: str, x: jax.Array, train: bool) -> jax.Array:
        cfg = self.config
        layer = LAYERS[LAYER_NAMES.index(name)]
        y = KerasLayer(layer, x.shape[-1], cfg, name=name)(x)
        act = {"enc": cfg.enc_activation, "dec": cfg.dec_activation}.get(layer.activation)
        if act is not None:
            y = ACTIVATIONS[act](y)
        rate = dropout_rate(name, cfg)
        if rate > 0:
            y = HashDropout(rate, deterministic=not train, name=name.removesuffix("_conv") + "_dr")(y)
        return self._pin(y)

    def _tail(self, x: jax.Array, lvl1: jax.Array, train: bool) -> jax.Array:
        """Full-resolution decoder: level-2 features (B, D/4, H/4, W/4, 2F) + skip -> logits."""
        f = self._layer
        x = f("up_2to1_conv", x, train) + lvl1  # skip_conn_lvl1
        x = f("dec_lvl1_block1_conv", x, train)
        return f("main_output", x, train).astype(jnp.float32)

    def _head(self, x: jax.Array, train: bool) -> jax.Array:
        """Full-resolution encoder: (B, D, H, W, 1) -> (B, D, H, W, F)."""
        return self._layer("enc_lvl1_block1_conv", x, train)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        check_input(x)
        f = self._layer
        x = self._pin(x)
        head, tail = type(self)._head, type(self)._tail
        if self.config.remat:
            # Recompute the full-resolution blocks in the backward pass, keeping only their inputs:
            # lvl1 (B, D, H, W, F) is then not held from the forward into the backward pass. The lifted
            # functions run in this module's scope, so parameter paths do not change.
            policy = jax.checkpoint_policies.nothing_saveable
            head = nn.remat(head, static_argnums=(2,), policy=policy)
            tail = nn.remat(tail, static_argnums=(3,), policy=policy)
        lvl1 = head(self, x, train)
        x = f("down_1to2_conv", lvl1, train)
        x = f("enc_lvl2_block1_conv", x, train)
        lvl2 = f("enc_lvl2_block2_conv", x, train)
        x = f("down_2to3_conv", lvl2, train)
        x = f("enc_lvl3_block1_conv", x, train)
        x = f("enc_lvl3_block2_conv", x, train)
        x = f("enc_lvl3_block3_conv", x, train)
        x = f("up_3to2_conv", x, train) + lvl2  # skip_conn_lvl2
        x = f("dec_lvl2_block1_conv", x, train)
        x = f("dec_lvl2_block2_conv", x, train)
        return tail(self, x, lvl1, train)


def init_params(config: ModelConfig, key: jax.Array, shape: tuple[int, int, int] = (8, 8, 8)) -> dict:
    """Random (glorot-normal) parameters: {layer_name: {"kernel", "bias"}} for ``config``; the same
    values whatever ``shape`` (the parameters' shapes come from the layer table)."""
    x = jnp.zeros((1, *shape, 1), jnp.float32)
    return Cerebrum7T(config).init(key, x)["params"]


def apply(
    params: dict, config: ModelConfig, x: jax.Array, *, train: bool = False, key=None, act_sharding=None
) -> jax.Array:
    """Logits (B, D, H, W, n_classes) of ``x`` (B, D, H, W, 1); ``key`` feeds dropout when training.

    ``act_sharding``: optional sharding applied to every activation (``cerebrum_jax.parallel.sharding``).
    """
    rngs = {"dropout": key} if train and key is not None else None
    module = Cerebrum7T(config, act_sharding=act_sharding)
    return module.apply({"params": params}, x, train=train, rngs=rngs)


def probabilities(params: dict, config: ModelConfig, x: jax.Array) -> jax.Array:
    """Softmax probabilities (B, D, H, W, n_classes), float32, in inference mode."""
    return jax.nn.softmax(apply(params, config, x), axis=-1)


def count_params(params) -> int:
    return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))
