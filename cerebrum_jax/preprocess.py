"""Preprocessing as pure numpy functions on (D, H, W) volumes: normalisation, padding/cropping to a grid.

Everything here works on one volume in voxel order as stored in the NIfTI file; the batch and
channel axes are added only when a volume goes into the network.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from cerebrum_jax.model import DIVISOR


def zscore(volume: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Per-volume z-score (float32), statistics from the voxels inside ``mask`` (all voxels when None).

    Voxels outside the mask are normalised with the same statistics (so a brain-masked input whose
    background is 0 keeps a constant background). A constant volume maps to 0.
    """
    volume = np.asarray(volume, np.float32)
    values = volume if mask is None else volume[np.asarray(mask, bool)]
    mean = float(values.mean()) if values.size else 0.0
    std = float(values.std()) if values.size else 0.0
    return ((volume - mean) / (std if std > 0 else 1.0)).astype(np.float32)


def voxelwise_zscore(volume: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """(volume - mean) / std voxel by voxel (all (D, H, W)); std == 0 is replaced by 1, as the original."""
    if volume.shape != mean.shape or volume.shape != std.shape:
        raise ValueError(f"volume {volume.shape} and mean/std {mean.shape}/{std.shape} differ in shape")
    std = np.where(std == 0, 1.0, std)
    return ((volume - mean) / std).astype(np.float32)


def grid_for(shape: tuple[int, ...], divisor: int = DIVISOR) -> tuple[int, ...]:
    """The smallest shape >= ``shape`` whose sizes are multiples of ``divisor``."""
    return tuple(-(-int(s) // divisor) * divisor for s in shape)


class PadCrop(NamedTuple):
    """How ``pad_or_crop`` changed a volume, per axis: (before, after) padding and (start, stop) crop."""

    original_shape: tuple[int, ...]
    pads: tuple[tuple[int, int], ...]
    crops: tuple[tuple[int, int], ...]


def pad_or_crop(volume: np.ndarray, target: tuple[int, ...], value: float = 0.0):
    """Centre ``volume`` (D, H, W[, C]) on the ``target`` spatial grid: pad with ``value`` or crop per axis.

    Returns (new volume, PadCrop); ``undo_pad_or_crop`` restores the original grid (cropped-away
    voxels come back as ``fill``).
    """
    pads, crops = [], []
    for size, want in zip(volume.shape[:3], target, strict=True):
        extra = want - size
        if extra >= 0:
            pads.append((extra // 2, extra - extra // 2))
            crops.append((0, size))
        else:
            start = (-extra) // 2
            pads.append((0, 0))
            crops.append((start, start + want))
    sl = tuple(slice(a, b) for a, b in crops)
    out = volume[sl]
    pad_width = pads + [(0, 0)] * (volume.ndim - 3)
    out = np.pad(out, pad_width, mode="constant", constant_values=value)
    return out, PadCrop(tuple(volume.shape[:3]), tuple(pads), tuple(crops))


def undo_pad_or_crop(volume: np.ndarray, info: PadCrop, fill: float = 0.0) -> np.ndarray:
    """Inverse of ``pad_or_crop`` for a (D, H, W[, C]) volume on the target grid."""
    sl = tuple(slice(b, volume.shape[i] - a) for i, (b, a) in enumerate(info.pads))
    inner = volume[sl]
    out = np.full(info.original_shape + volume.shape[3:], fill, dtype=volume.dtype)
    out[tuple(slice(a, b) for a, b in info.crops)] = inner
    return out
