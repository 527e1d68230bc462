"""Whole-volume segmentation: normalise, pad to the network's grid, one jit-compiled forward pass, unpad.

Volumes are (D, H, W) numpy arrays in the voxel order of their NIfTI file; the network sees them
as (1, D', H', W', 1) with D', H', W' multiples of 8 (``preprocess.grid_for``), or, with voxelwise
normalisation, on the grid of the checkpoint's mean/std volumes. The whole volume goes through the
network at once, as in the original; on a CPU the full-resolution layers run in depth slabs
(``model.probabilities_lean``, the same function), which bounds memory and is faster there.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import numpy as np

from cerebrum_jax import model, preprocess
from cerebrum_jax.model import ModelConfig

NORMALIZATIONS = ("zscore", "voxelwise", "none")


@functools.lru_cache(maxsize=8)
def forward_fn(config: ModelConfig) -> Callable:
    """Jit-compiled ``(params, x (1, D, H, W, 1)) -> probabilities (1, D, H, W, n_classes)`` of ``config``.

    On a CPU backend it is ``model.probabilities_lean`` (depth slabs at full resolution: a 256x352x224
    volume within 3 GB instead of 11 GB, and about 3x faster at any size, as XLA:CPU's 2-D convolutions
    beat its 3-D ones); elsewhere ``model.probabilities``. The two agree to float rounding.
    Cached per (hashable, frozen) config so repeated calls on volumes of the same shape reuse
    one compilation.
    """

    def forward(params, x):
        if jax.default_backend() == "cpu":
            return model.probabilities_lean(params, config, x)
        return model.probabilities(params, config, x)

    return jax.jit(forward)


def prepare(
    volume: np.ndarray,
    *,
    normalization: str = "zscore",
    norm_volumes: dict | None = None,
    mask: np.ndarray | None = None,
) -> tuple[np.ndarray, preprocess.PadCrop]:
    """Normalise ``volume`` (D, H, W) and put it on the network's grid.

    Returns (network input (D', H', W') float32, PadCrop to undo the grid change).
    zscore: statistics from the original voxels (inside ``mask`` when given); padded voxels are
    raw zeros normalised with the same statistics, so they look like the (zero) background.
    voxelwise: the raw volume is padded with zeros / cropped to the mean/std volumes' grid, then
    normalised voxel by voxel (std 0 -> 1). none: padded with zeros.
    """
    volume = np.asarray(volume, np.float32)
    if volume.ndim != 3:
        raise ValueError(f"volume must be 3-D (D, H, W), got shape {volume.shape}")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, not {normalization!r}")
    if mask is not None and np.shape(mask) != volume.shape:
        raise ValueError(f"mask shape {np.shape(mask)} differs from volume shape {volume.shape}")
    if normalization == "voxelwise":
        if norm_volumes is None:
            raise ValueError("voxelwise normalization needs norm_volumes={'mean', 'std'}")
        mean = np.asarray(norm_volumes["mean"], np.float32)
        std = np.asarray(norm_volumes["std"], np.float32)
        padded, info = preprocess.pad_or_crop(volume, mean.shape)
        return preprocess.voxelwise_zscore(padded, mean, std), info
    padded, info = preprocess.pad_or_crop(volume, preprocess.grid_for(volume.shape))
    if normalization == "none":
        return padded, info
    inside = np.ones(volume.shape, bool) if mask is None else np.asarray(mask, bool)
    inside, _ = preprocess.pad_or_crop(inside, padded.shape, value=False)
    return preprocess.zscore(padded, inside), info


def segment(
    volume: np.ndarray,
    params: dict,
    config: ModelConfig,
    *,
    normalization: str = "zscore",
    norm_volumes: dict | None = None,
    mask: np.ndarray | None = None,
    mesh=None,
) -> np.ndarray:
    """Class probabilities (D, H, W, n_classes) float32 of a whole volume (D, H, W).

    ``normalization``: "zscore" (per volume, statistics inside ``mask`` (D, H, W) bool when given),
    "voxelwise" (``norm_volumes`` {"mean", "std"} of the training set, whose shape sets the grid)
    or "none". Voxels cropped away to fit a smaller voxelwise grid come back as background
    (probability 1 for class 0). Labels are ``probs.argmax(-1)``.
    ``mesh``: a ``jax.sharding.Mesh`` (``sharding.make_mesh``) to split the forward along depth over its
    devices (``sharding.sharded_forward``; the grid's depth / 8 must divide by the mesh's "space" size,
    else ValueError); None: one device.
    """
    x, info = prepare(volume, normalization=normalization, norm_volumes=norm_volumes, mask=mask)
    if mesh is None:
        probs = forward_fn(config)(params, x[None, ..., None])
    else:
        from cerebrum_jax import sharding

        probs = sharding.sharded_forward(params, config, x[None, ..., None], mesh)
    probs = np.asarray(probs[0], np.float32)
    out = preprocess.undo_pad_or_crop(probs, info, fill=0.0)
    covered = preprocess.undo_pad_or_crop(np.ones(x.shape, bool), info, fill=False)
    out[~covered, 0] = 1.0
    return out


def labels_from(probs: np.ndarray) -> np.ndarray:
    """Argmax labels (D, H, W) uint8 of probabilities (D, H, W, n_classes)."""
    return np.argmax(probs, axis=-1).astype(np.uint8)
