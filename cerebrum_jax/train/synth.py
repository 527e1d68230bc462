"""Label-conditioned intensity randomisation: a new image drawn from a view's labels, on the device.

The idea of SynthSeg (Billot et al., Medical Image Analysis 2023, doi:10.1016/j.media.2023.102789) and
GOUHFI (Fortin et al. 2025, for ultra-high field): a network that sees every class with random
intensities learns shapes, not one scanner's contrast, and holds up on another (MP2RAGE UNI, T1 maps,
MPRAGE). Per view: each foreground class gets a mean (uniform in [0, 1]) and a spread (uniform in
[0, ``synth_std``]); the background keeps the real image (heads, skull and noise are what a test image
has there); then a Gaussian blur (sigma uniform in [0, ``synth_blur``] voxels: a lower resolution and
partial volume), a smooth multiplicative bias field (log-gain N(0, ``synth_bias``) on a 4^3 grid,
cubic), a gamma (exp N(0, ``synth_gamma``)) and Gaussian noise (sd uniform in [0, ``synth_noise``] of
the range); finally the result is scaled to the real view's foreground mean and standard deviation, so
the network's input range does not change. With probability ``p_synth`` the view's image is replaced by
it (``augment.apply_params``, after the spatial transform, before the other intensity operations).

Pure operations first (``class_intensities``, ``gaussian_blur``, ``smooth_gain``, ``match_moments``),
then the random draw ``rand_synth`` (-> ``SynthParams``, a pytree that vmaps) and ``synth_image``.
Shapes: volumes (D, H, W) float32, labels (D, H, W) int class indices; deterministic from the key.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

MAX_CLASSES = 64  # classes a label map may have here (the drawn means are a fixed-size table)
BLUR_RADIUS = 3  # taps each side of the blur kernel (covers sigma <= ~1.5 voxels)
BIAS_POINTS = 4


class SynthParams(NamedTuple):
    """One view's draw: apply () bool, means / stds (MAX_CLASSES,), blur_sigma () voxels, bias_grid
    (BIAS_POINTS,)*3 log-gain, log_gamma (), noise_sd () (share of the range), noise_key."""

    apply: jax.Array
    means: jax.Array
    stds: jax.Array
    blur_sigma: jax.Array
    bias_grid: jax.Array
    log_gamma: jax.Array
    noise_sd: jax.Array
    noise_key: jax.Array


# ---------------------------------------------------------------- pure operations


def class_intensities(labels, means, stds, noise) -> jax.Array:
    """means[l] + stds[l] * noise voxelwise: labels (D, H, W) int, means/stds (K,), noise like labels."""
    index = jnp.clip(labels.astype(jnp.int32), 0, means.shape[0] - 1)
    return means[index] + stds[index] * noise


def gaussian_blur(volume, sigma) -> jax.Array:
    """Separable Gaussian blur of volume (D, H, W) with ``sigma`` voxels (traced; 0 leaves it as is), a
    (2 BLUR_RADIUS + 1)-tap kernel per axis, edges repeated."""
    x = jnp.arange(-BLUR_RADIUS, BLUR_RADIUS + 1, dtype=jnp.float32)
    w = jnp.exp(-0.5 * x**2 / jnp.maximum(sigma, 1e-3) ** 2)
    w = w / jnp.sum(w)
    r = BLUR_RADIUS
    for axis in range(3):
        pad = [(0, 0)] * 3
        pad[axis] = (r, r)
        padded = jnp.pad(volume, pad, mode="edge")
        n = volume.shape[axis]
        volume = sum(w[i] * jax.lax.slice_in_dim(padded, i, i + n, axis=axis) for i in range(2 * r + 1))
    return volume


def smooth_gain(log_gain_grid, shape) -> jax.Array:
    """exp of the cubic upsampling of log_gain_grid (P, P, P) to ``shape``: a smooth positive field."""
    return jnp.exp(jax.image.resize(log_gain_grid, shape, "cubic"))


def match_moments(volume, reference, mask) -> jax.Array:
    """``volume`` shifted and scaled to the mean and standard deviation of ``reference`` over ``mask``
    (all (D, H, W); mask bool, at least one voxel)."""
    m = mask.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(m), 1.0)

    def moments(v):
        mean = jnp.sum(v * m) / n
        return mean, jnp.sqrt(jnp.sum(((v - mean) * m) ** 2) / n)

    (vm, vs), (rm, rs) = moments(volume), moments(reference)
    return (volume - vm) / jnp.maximum(vs, 1e-6) * rs + rm


# ---------------------------------------------------------------- random draw and the composed image


def rand_synth(key, cfg) -> SynthParams:
    """One view's ``SynthParams`` from ``key`` and the ``augment.AugmentConfig`` ``cfg`` (its synth_*
    ranges and p_synth; apply is False unless ``cfg.synth``)."""
    k = jax.random.split(key, 8)
    apply = (jax.random.uniform(k[0]) < cfg.p_synth) & cfg.synth
    return SynthParams(
        apply,
        jax.random.uniform(k[1], (MAX_CLASSES,)),
        jax.random.uniform(k[2], (MAX_CLASSES,)) * cfg.synth_std,
        jax.random.uniform(k[3]) * cfg.synth_blur,
        jax.random.normal(k[4], (BIAS_POINTS,) * 3) * cfg.synth_bias,
        jax.random.normal(k[5]) * cfg.synth_gamma,
        jax.random.uniform(k[6]) * cfg.synth_noise,
        k[7],
    )


def synth_image(params: SynthParams, volume, labels) -> jax.Array:
    """The synthetic image of ``labels`` (D, H, W) int for the real ``volume`` (D, H, W) float32 (its
    background and moments), computed whatever ``params.apply`` says."""
    k_class, k_noise = jax.random.split(params.noise_key)
    fg = labels > 0
    lo, hi = jnp.min(volume), jnp.max(volume)
    real01 = (volume - lo) / jnp.maximum(hi - lo, 1e-6)
    noise = jax.random.normal(k_class, volume.shape)
    v = jnp.where(fg, class_intensities(labels, params.means, params.stds, noise), real01)
    v = gaussian_blur(v, params.blur_sigma) * smooth_gain(params.bias_grid, volume.shape)
    v = jnp.clip(v, 0.0, None)
    v = (v / jnp.maximum(jnp.max(v), 1e-6)) ** jnp.exp(params.log_gamma)
    v = v + params.noise_sd * jax.random.normal(k_noise, volume.shape)
    return match_moments(v, volume, fg | (jnp.sum(fg) == 0))


def apply_synth(params: SynthParams, volume, labels) -> jax.Array:
    """``synth_image`` where ``params.apply``, else ``volume`` unchanged (a ``lax.cond``: the synthetic
    image is only computed for the views that use it)."""
    return jax.lax.cond(params.apply, lambda v: synth_image(params, v, labels), lambda v: v, volume)
