"""Lean whole-volume inference: ``probabilities_lean``, the forward pass ``predictor`` runs on a CPU.

The full-resolution layers run depth slab by depth slab (no whole-volume level-1 tensor ever exists, so a
256x352x224 volume needs about 3 GB instead of 11), and the 3x3x3 convolutions as 2-D ones
(``model.conv3d_depth_taps``, which XLA:CPU computes 2.5-3x faster). ``layer_fn`` (one layer and its
activation, as ``model.Cerebrum7T`` computes it in inference mode) is shared with ``streamed``, the
training step of the same slab geometry.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from cerebrum_jax.model.network import (
    ACTIVATIONS,
    DIVISOR,
    LAYER_NAMES,
    LAYERS,
    OPS,
    ModelConfig,
    check_input,
    conv3d_depth_taps,
)

# Default slab depth of probabilities_lean. Measured on a 2-core CPU (shared, loaded), 256x352x224 with 24
# filters: slab 8: 11.7 s, 2.4 GB peak RSS; 16: 11.6 s, 2.9 GB; 32: 12.8 s, 3.8 GB. At 64x88x56 16 was
# also faster than 32 or one slab (0.19 s vs 0.21 s and 0.23 s).
LEAN_SLAB = 16


def layer_fn(params: dict, config: ModelConfig, name: str, x: jax.Array, valid_depth: bool = False):
    """Layer ``name`` plus its activation, as ``Cerebrum7T`` computes it in inference mode (dtypes too).

    The 3x3x3 convs run as ``conv3d_depth_taps``; ``valid_depth``: x carries its own one-row D halo (else
    it is zero-padded along D here, which is 'same' padding).
    """
    layer = LAYERS[LAYER_NAMES.index(name)]
    dtype = jnp.dtype("float32" if layer.activation == "softmax" else config.compute_dtype)
    kernel, bias = params[name]["kernel"].astype(dtype), params[name]["bias"].astype(dtype)
    x = x.astype(dtype)
    if layer.op == "conv" and layer.kernel > 1:
        r = 0 if valid_depth else layer.kernel // 2
        y = conv3d_depth_taps(jnp.pad(x, ((0, 0), (r, r), (0, 0), (0, 0), (0, 0))), kernel) + bias
    else:
        y = OPS[layer.op](x, kernel, bias)
    act = {"enc": config.enc_activation, "dec": config.dec_activation}.get(layer.activation)
    return y if act is None else ACTIVATIONS[act](y)


def probabilities_lean(
    params: dict, config: ModelConfig, x: jax.Array, *, slab: int = LEAN_SLAB
) -> jax.Array:
    """``probabilities(params, config, x)`` computed depth slab by depth slab at full resolution, so that no
    whole-volume level-1 tensor (B, D, H, W, n_filters) ever exists; the inference forward on a CPU.

    The same function as ``probabilities`` (no dropout; equal to float rounding, as its 3x3x3 convs run as
    ``conv3d_depth_taps``, which XLA:CPU computes 2.5-3x faster), in three stages:
      A. per slab of ``slab`` rows (a multiple of 8): enc_lvl1_block1_conv on the slab plus a one-row
         halo of the input, then down_1to2_conv -> the slab's rows of the level-2 input;
      B. levels 2 and 3 on the whole (small) level-2 volume -> dec_lvl2_block2_conv's output;
      C. per slab: enc_lvl1_block1_conv again (slab + 2 rows), up_2to1_conv of the matching level-2 rows
         (one extra each side, cut to slab + 2 rows), the skip sum (zero outside the volume, as 'same'
         padding has it), dec_lvl1_block1_conv, main_output and the softmax -> the slab of the result.
    Slabs run in ``lax.fori_loop``s writing into preallocated arrays, so one slab's intermediates are alive
    at a time. D need not be a multiple of ``slab``: the last slab then starts at D - slab and rewrites
    rows of the one before with the same values.
    Returns (B, D, H, W, n_classes) float32.

    Longer than 60 lines on purpose: the three stages share the slab geometry (``start``, ``q``, the padded
    inputs) as closures of one function, the form the ``fori_loop`` bodies need; split, they would pass the
    same six values around.
    """
    check_input(x)
    b, d, h, w, _ = x.shape
    slab = int(slab)
    if slab < DIVISOR or slab % DIVISOR:
        raise ValueError(f"slab must be a positive multiple of {DIVISOR}, not {slab}")
    slab = min(slab, d)
    n_slabs = -(-d // slab)
    f = functools.partial(layer_fn, params, config)
    dtype = jnp.dtype(config.compute_dtype)
    q = LAYERS[LAYER_NAMES.index("down_1to2_conv")].kernel  # 4: level-1 rows per level-2 row

    def start(i):  # a multiple of 8 (d and slab are), so level-2 rows line up
        return jnp.minimum(i * slab, d - slab)

    def depth_pad(v, r):
        return jnp.pad(v, ((0, 0), (r, r), (0, 0), (0, 0), (0, 0)))

    # A: level-1 encoder and down-sampling, slab by slab -> level-2 input (B, D/4, H/4, W/4, 2F).
    xa = depth_pad(x, 1)

    def encode(i, lvl2):
        s = start(i)
        e1 = f(
            "enc_lvl1_block1_conv", jax.lax.dynamic_slice_in_dim(xa, s, slab + 2, axis=1), valid_depth=True
        )
        return jax.lax.dynamic_update_slice_in_dim(lvl2, f("down_1to2_conv", e1), s // q, axis=1)

    width = config.channels(LAYERS[LAYER_NAMES.index("down_1to2_conv")])
    v = jax.lax.fori_loop(0, n_slabs, encode, jnp.zeros((b, d // q, h // q, w // q, width), dtype))

    # B: levels 2 and 3 on the whole level-2 volume.
    lvl2 = f("enc_lvl2_block2_conv", f("enc_lvl2_block1_conv", v))
    v = f("down_2to3_conv", lvl2)
    for name in ("enc_lvl3_block1_conv", "enc_lvl3_block2_conv", "enc_lvl3_block3_conv"):
        v = f(name, v)
    v = f("up_3to2_conv", v) + lvl2  # skip_conn_lvl2
    v = f("dec_lvl2_block2_conv", f("dec_lvl2_block1_conv", v))

    # C: level-1 decoder, head and softmax, slab by slab.
    xc, vc = depth_pad(x, 2), depth_pad(v, 1)
    rows = jnp.arange(slab + 2)[None, :, None, None, None]

    def decode(i, out):
        s = start(i)  # the slab's skip sum covers rows s - 1 .. s + slab (one-row halo each side)
        e1 = f(
            "enc_lvl1_block1_conv", jax.lax.dynamic_slice_in_dim(xc, s, slab + 4, axis=1), valid_depth=True
        )
        up = f("up_2to1_conv", jax.lax.dynamic_slice_in_dim(vc, s // q, slab // q + 2, axis=1))
        skip = up[:, q - 1 : q + slab + 1] + e1  # up covers rows s - 4 .. s + slab + 3
        skip = jnp.where((s - 1 + rows >= 0) & (s - 1 + rows < d), skip, jnp.zeros((), skip.dtype))
        logits = f("main_output", f("dec_lvl1_block1_conv", skip, valid_depth=True))
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        return jax.lax.dynamic_update_slice_in_dim(out, probs, s, axis=1)

    return jax.lax.fori_loop(0, n_slabs, decode, jnp.zeros((b, d, h, w, config.n_classes), jnp.float32))
