"""Whole-volume training in bounded memory: the training loss of ``train.make_train_step`` (and the metrics
of ``train.make_eval_step``) with the full-resolution layers streamed depth slab by depth slab.

A training step of the plain model at 256 x 352 x 224 holds several whole level-1 tensors (B, D, H, W, F)
from the forward into the backward pass (XLA:CPU asked for 94 GB). Here the level-1 layers never exist
whole; the loss is computed in three stages (the slab geometry of ``lean.probabilities_lean``):

  A. per slab of ``slab`` rows (a multiple of 4): enc_lvl1_block1_conv on the slab plus a one-row input
     halo, then down_1to2_conv -> the slab's rows of the level-2 input (B, slab/4, H/4, W/4, 2F);
  B. levels 2 and 3 on the whole level-2 volume (64x smaller), with their dropout as in the model;
  C. per slab: enc_lvl1_block1_conv again (slab + 2 rows: recomputing it on the halo is cheaper than
     storing it), up_2to1_conv of the matching level-2 rows and its dropout, the skip sum (zero outside
     the volume, as 'same' padding has it), dec_lvl1_block1_conv, main_output -> logits (B, slab, H, W, C)
     float32 -> the slab's loss sums: weighted cross-entropy sum and soft TP / FP / FN per class (one-hot
     labels of the slab only).
Stages A and C are ``lax.map`` loops over ``jax.checkpoint``-ed slab bodies, so the backward pass
recomputes one slab at a time: level-1 memory is O(slab), not O(volume). D need not be a multiple of the
slab: the last slab starts at D - slab and counts only its rows that no earlier slab counted.

The loss is the whole-volume one: cross-entropy = sum over slabs / (B D H W), the original's multilabel
Dice (Svanera et al., Human Brain Mapping 2021, doi:10.1002/hbm.25636; github.com/rockNroll87q/cerebrum7t)
from the TP / FP / FN sums over all slabs. Dropout masks are bit for bit the model's (same keys, same
bits): ``model.dropout`` hashes each element's index in the whole tensor, so levels 2-3 draw them whole and
the full-resolution one after up_2to1_conv per slab, for the slab's rows of the whole tensor (rows outside
the volume get masks that are never used).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import linen as nn

from cerebrum_jax.model import lean
from cerebrum_jax.model import network as model
from cerebrum_jax.model.network import LAYER_NAMES, LAYERS, ModelConfig
from cerebrum_jax.train import losses
from cerebrum_jax.train.losses import LossConfig

Q = LAYERS[LAYER_NAMES.index("down_1to2_conv")].kernel  # 4: level-1 rows per level-2 row
# The automatic slab_rows: 0 (the plain step) up to AUTO_MAX_VOXELS voxels per volume, AUTO_SLAB above.
# The plain step needs about 4.7 KB per voxel on XLA:CPU (94 GB at 256x352x224), so 2 M voxels ~ 9 GB.
AUTO_MAX_VOXELS = 1 << 21
AUTO_SLAB = 8  # compiled temp at 256x352x224: 3.7 GB (16 rows: 4.7 GB, 4 rows: 3.2 GB)


def auto_slab_rows(grid) -> int:
    """The default slab depth for a (D, H, W) grid: 0 (the plain step) when it is small, else AUTO_SLAB."""
    return AUTO_SLAB if math.prod(grid) > AUTO_MAX_VOXELS else 0


def check_slab_rows(slab: int, depth: int) -> int:
    """``slab`` (a positive multiple of 4 rows) capped at ``depth``; ValueError otherwise."""
    slab = int(slab)
    if slab < Q or slab % Q:
        raise ValueError(f"slab_rows must be a positive multiple of {Q} (one level-2 row), not {slab}")
    return min(slab, depth)


def _dropout_name(name: str) -> str:
    return name.removesuffix("_conv") + "_dr"


class _DropoutKeys(nn.Module):
    """The key each ``Cerebrum7T`` Dropout submodule (named ``names``) draws from the 'dropout' rng."""

    names: tuple[str, ...]

    @nn.compact
    def __call__(self):
        return {n: model.DropoutKey(name=n)() for n in self.names}


def dropout_keys(config: ModelConfig, key) -> dict:
    """{layer name: the key of its Dropout in ``model.apply(..., train=True, key=key)``} (rate > 0 only)."""
    names = [n for n in LAYER_NAMES if model.dropout_rate(n, config) > 0]
    if key is None or not names:
        return {}
    keys = _DropoutKeys(tuple(_dropout_name(n) for n in names)).apply({}, rngs={"dropout": key})
    return {n: keys[_dropout_name(n)] for n in names}


@jax.custom_vjp
def _conv_valid_depth(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """``model.conv3d_depth_taps`` (x carries its D halo) with a matmul kernel gradient (``_kernel_grad``)."""
    return model.conv3d_depth_taps(x, kernel)


def _conv_fwd(x, kernel):
    return model.conv3d_depth_taps(x, kernel), (x, kernel)


def _input_grad(kernel: jax.Array, g: jax.Array) -> jax.Array:
    """d loss / d x (B, d + k - 1, H, W, Cin) of ``conv3d_depth_taps(x, kernel)`` from its output cotangent
    g (B, d, H, W, Cout): the same kind of convolution on g zero-padded by k - 1 rows along D, with the
    kernel flipped along D, H, W and its channels swapped. Written out because XLA:CPU emits the transposed
    2-D convolutions of ``jax.vjp`` inside a ``lax.map`` body as a naive loop (about 10x the forward conv's
    time: 3.7 s vs 0.35 s CPU for dec_lvl1 at 64x88x56), while this forward form stays on its fast path."""
    k = kernel.shape[0]
    flipped = jnp.swapaxes(kernel[::-1, ::-1, ::-1], 3, 4)
    return model.conv3d_depth_taps(jnp.pad(g, ((0, 0), (k - 1, k - 1), (0, 0), (0, 0), (0, 0))), flipped)


def _conv_bwd(res, g):
    x, kernel = res
    kernel_grad = model._kernel_grad(x, kernel, g, pad_depth=False)
    return _input_grad(kernel, g).astype(x.dtype), kernel_grad


_conv_valid_depth.defvjp(_conv_fwd, _conv_bwd)


def _layer(params, config: ModelConfig, name: str, x: jax.Array, valid_depth: bool = False) -> jax.Array:
    """``lean.layer_fn``, with the matmul kernel gradient for 3x3x3 convs whose input has its D halo."""
    layer = LAYERS[LAYER_NAMES.index(name)]
    # on other backends than XLA:CPU, the convolution's own gradient (see model.conv3d_same)
    if not (valid_depth and layer.op == "conv" and layer.kernel > 1) or jax.default_backend() != "cpu":
        return lean.layer_fn(params, config, name, x, valid_depth)
    dtype = jnp.dtype(config.compute_dtype)
    kernel, bias = params[name]["kernel"].astype(dtype), params[name]["bias"].astype(dtype)
    y = _conv_valid_depth(x.astype(dtype), kernel) + bias
    act = {"enc": config.enc_activation, "dec": config.dec_activation}[layer.activation]
    return model.ACTIVATIONS[act](y)


def _slab_starts(depth: int, slab: int) -> jax.Array:
    n = -(-depth // slab)
    return jnp.minimum(jnp.arange(n) * slab, depth - slab)


def _encode(params, config: ModelConfig, x: jax.Array, slab: int) -> jax.Array:
    """Stage A: x (B, D, H, W, 1) -> down_1to2_conv's output (B, D/4, H/4, W/4, 2F), slab by slab."""
    d = x.shape[1]
    xa = jnp.pad(x, ((0, 0), (1, 1), (0, 0), (0, 0), (0, 0)))

    @jax.checkpoint
    def body(s):
        rows = jax.lax.dynamic_slice_in_dim(xa, s, slab + 2, axis=1)
        e1 = _layer(params, config, "enc_lvl1_block1_conv", rows, True)
        return _layer(params, config, "down_1to2_conv", e1)

    parts = jax.lax.map(body, _slab_starts(d, slab))  # (n, B, slab/4, H/4, W/4, 2F)
    n, m = parts.shape[0], slab // Q
    flat = jnp.moveaxis(parts, 0, 1).reshape(parts.shape[1], n * m, *parts.shape[3:])
    over = (n * slab - d) // Q  # level-2 rows of the last slab already given by the one before
    return flat if over == 0 else jnp.concatenate([flat[:, : (n - 1) * m], flat[:, (n - 1) * m + over :]], 1)


def _levels23(params, config: ModelConfig, v: jax.Array, keys: dict) -> jax.Array:
    """Stage B: levels 2 and 3, whole, with dropout where ``keys`` has the layer -> dec_lvl2_block2_conv's
    output (B, D/4, H/4, W/4, 2F)."""

    def g(name, x):
        y = lean.layer_fn(params, config, name, x)
        return model.dropout(y, keys[name], model.dropout_rate(name, config)) if name in keys else y

    lvl2 = g("enc_lvl2_block2_conv", g("enc_lvl2_block1_conv", v))
    v = g("down_2to3_conv", lvl2)
    for name in ("enc_lvl3_block1_conv", "enc_lvl3_block2_conv", "enc_lvl3_block3_conv"):
        v = g(name, v)
    v = g("up_3to2_conv", v) + lvl2  # skip_conn_lvl2
    return g("dec_lvl2_block2_conv", g("dec_lvl2_block1_conv", v))


def _slab_sums(logits, labels, class_weights, count, hard: bool, skel=None) -> dict:
    """Loss sums of one slab: logits (B, n, H, W, C) float32, labels (B, n, H, W), count (n,) bool (rows
    this slab counts). {"ce": weighted -log p sum, "tp", "fp", "fn": (C,)} (+ "inter", "total" (C,) of the
    argmax prediction when ``hard``; + "skel_hit", "skel_n" (C,), ``losses.skeleton_sums``, when the slab's
    tubed skeleton ``skel`` (B, n, H, W) is given)."""
    c = logits.shape[-1]
    wrow = count.astype(jnp.float32)[None, :, None, None]
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    if class_weights is not None:
        picked = picked * jnp.asarray(class_weights, jnp.float32)[labels]
    probs = jax.nn.softmax(logits, axis=-1)
    onehot = jax.nn.one_hot(labels, c, dtype=jnp.float32)
    axes = (0, 1, 2, 3)
    w = wrow[..., None]
    out = {
        "ce": -jnp.sum(picked * wrow),
        "tp": jnp.sum(probs * onehot * w, axis=axes),
        "fp": jnp.sum(probs * (1.0 - onehot) * w, axis=axes),
        "fn": jnp.sum((1.0 - probs) * onehot * w, axis=axes),
    }
    if hard:
        pred = jax.nn.one_hot(jnp.argmax(logits, axis=-1), c, dtype=jnp.float32)
        out["inter"] = jnp.sum(pred * onehot * w, axis=axes)
        out["total"] = jnp.sum((pred + onehot) * w, axis=axes)
    if skel is not None:
        out["skel_hit"], out["skel_n"] = losses.skeleton_sums(logits, labels, skel * wrow.astype(skel.dtype))
    return out


def _decode_sums(params, config, x, labels, class_weights, v, slab, up_key, hard=False, skel=None) -> dict:
    """Stage C: the level-1 decoder and the loss sums, slab by slab, summed over slabs (see _slab_sums)."""
    d = x.shape[1]
    xc = jnp.pad(x, ((0, 0), (2, 2), (0, 0), (0, 0), (0, 0)))
    vc = jnp.pad(v, ((0, 0), (1, 1), (0, 0), (0, 0), (0, 0)))
    rows = jnp.arange(slab + 2)[None, :, None, None, None]
    f = lambda name, t, valid=False: _layer(params, config, name, t, valid)  # noqa: E731

    @jax.checkpoint
    def body(args):
        i, s = args  # the slab's skip sum covers rows s - 1 .. s + slab (one-row halo each side)
        e1 = f("enc_lvl1_block1_conv", jax.lax.dynamic_slice_in_dim(xc, s, slab + 4, axis=1), True)
        up = f("up_2to1_conv", jax.lax.dynamic_slice_in_dim(vc, s // Q, slab // Q + 2, axis=1))
        up = up[:, Q - 1 : Q + slab + 1]  # up covered rows s - 4 .. s + slab + 3
        if up_key is not None:
            up = model.dropout(up, up_key, model.dropout_rate("up_2to1_conv", config), d, s - 1)
        skip = up + e1  # skip_conn_lvl1
        skip = jnp.where((s - 1 + rows >= 0) & (s - 1 + rows < d), skip, jnp.zeros((), skip.dtype))
        logits = f("main_output", f("dec_lvl1_block1_conv", skip, True)).astype(jnp.float32)
        lab = jax.lax.dynamic_slice_in_dim(labels, s, slab, axis=1)
        count = s + jnp.arange(slab) >= i * slab  # the last slab may overlap the one before
        sk = None if skel is None else jax.lax.dynamic_slice_in_dim(skel, s, slab, axis=1)
        return _slab_sums(logits, lab, class_weights, count, hard, sk)

    starts = _slab_starts(d, slab)
    sums = jax.lax.map(body, (jnp.arange(starts.shape[0]), starts))
    return jax.tree_util.tree_map(lambda t: jnp.sum(t, axis=0), sums)


def _sums(params, config, batch, loss_config, slab, key, hard=False) -> dict:
    x, labels = batch["image"], batch["labels"]
    model.check_input(x)
    if labels.shape != x.shape[:-1]:
        raise ValueError(f"labels (B, D, H, W) expected for image {x.shape}, got {labels.shape}")
    slab = check_slab_rows(slab, x.shape[1])
    keys = dropout_keys(config, key)
    v = _levels23(params, config, _encode(params, config, x, slab), keys)
    weights = losses.ce_weights(batch["class_weights"], loss_config.class_weights, loss_config.thin_classes)
    skel = batch["skeleton"] if loss_config.uses_skeleton else None
    return _decode_sums(params, config, x, labels, weights, v, slab, keys.get("up_2to1_conv"), hard, skel)


def _loss_from_sums(sums: dict, n_voxels: int, loss_config: LossConfig) -> tuple[jax.Array, dict]:
    ce = sums["ce"] / n_voxels
    tp, fp, fn = sums["tp"], sums["fp"], sums["fn"]
    soft_dice = (tp + losses.SMOOTH) / (tp + losses.SMOOTH + 0.5 * fp + 0.5 * fn)
    dl = jnp.sum(1.0 - soft_dice)
    total = {"ce": ce, "dice": dl, "ce+dice": ce + dl}[loss_config.loss]
    metrics = {"ce": ce, "dice_loss": dl, "soft_dice": soft_dice}
    if loss_config.uses_skeleton:
        sl = losses.skeleton_recall_from_sums(sums["skel_hit"], sums["skel_n"], loss_config.skeleton_classes)
        metrics["skeleton_loss"] = sl
        total = total + loss_config.skeleton_weight * sl
    return total, {"loss": total, **metrics}


def loss_terms(
    params, config: ModelConfig, loss_config: LossConfig, batch: dict, slab: int, key=None
) -> tuple[jax.Array, dict]:
    """(total loss, {"loss", "ce", "dice_loss"}) of ``losses.loss_terms(model.apply(params, config,
    batch["image"], train=key is not None, key=key), ...)``, computed slab by slab (differentiable).

    batch: {"image": (B, D, H, W, 1), "labels": (B, D, H, W) int, "class_weights": (C,)}; slab: rows per
    slab (a multiple of 4; capped at D); key: the dropout key (None: no dropout, inference mode).
    """
    sums = _sums(params, config, batch, loss_config, slab, key)
    total, metrics = _loss_from_sums(sums, math.prod(batch["labels"].shape), loss_config)
    metrics.pop("soft_dice")
    return total, metrics


def eval_metrics(params, config: ModelConfig, loss_config: LossConfig, batch: dict, slab: int) -> dict:
    """``train.make_eval_step``'s metrics (loss, ce, dice_loss, soft_dice (C,), dice (C,)), slab by slab."""
    sums = _sums(params, config, batch, loss_config, slab, None, hard=True)
    _, metrics = _loss_from_sums(sums, math.prod(batch["labels"].shape), loss_config)
    inter, total = sums["inter"], sums["total"]
    metrics["dice"] = jnp.where(total > 0, 2.0 * inter / jnp.maximum(total, 1.0), jnp.nan)  # n/a: absent
    return metrics
