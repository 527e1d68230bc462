"""Preprocessing as pure numpy functions on (D, H, W) volumes: normalisation, padding/cropping to a grid,
brain masks and bounding boxes, resampling, training-set statistics. ``inputs`` composes them into the
preparation of one subject (``inputs.load_subject``, ``inputs.prepare``).

Everything here works on one volume in voxel order as stored in the NIfTI file; the batch and
channel axes are added only when a volume goes into the network.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from nibabel import processing
from scipy import ndimage

from cerebrum_jax.errors import InputError
from cerebrum_jax.model.spec import DIVISOR


def zscore(volume: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Per-volume z-score (float32), statistics from the voxels inside ``mask`` (all voxels when None).

    Voxels outside the mask are normalised with the same statistics (so a brain-masked input whose
    background is 0 keeps a constant background). A constant volume maps to 0. Statistics and the
    division run in float64 (in float32 the variance of values beyond ~1e19 overflows and every voxel
    became 0); InputError if they are still not finite.
    """
    volume = np.asarray(volume, np.float64)
    values = volume if mask is None else volume[np.asarray(mask, bool)]
    mean = float(values.mean()) if values.size else 0.0
    std = float(values.std()) if values.size else 0.0
    if not (np.isfinite(mean) and np.isfinite(std)):
        raise InputError(f"z-score statistics of the image are not finite (mean {mean:.3g}, std {std:.3g})")
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


# ----------------------------------------------------------------------------------------------------------
# Masks, bounding boxes, resampling and training-set statistics


def mask_from_labels(labels: np.ndarray, dilation: int = 0) -> np.ndarray:
    """Brain mask (bool, same shape) = labels > 0, dilated ``dilation`` times (6-connected, in voxels)."""
    mask = np.asarray(labels) > 0
    if dilation > 0:
        mask = ndimage.binary_dilation(mask, iterations=int(dilation))
    return mask


class Box(NamedTuple):
    """A sub-block of a (D, H, W) grid: per axis [start, stop), with the shape of the grid it came from."""

    starts: tuple[int, ...]
    stops: tuple[int, ...]
    source_shape: tuple[int, ...]

    @property
    def slices(self) -> tuple[slice, ...]:
        return tuple(slice(a, b) for a, b in zip(self.starts, self.stops, strict=True))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(b - a for a, b in zip(self.starts, self.stops, strict=True))

    def grown(self, margin: int) -> Box:
        """This box grown by ``margin`` voxels per side, clipped to its grid."""
        starts = tuple(max(a - margin, 0) for a in self.starts)
        stops = tuple(min(b + margin, n) for b, n in zip(self.stops, self.source_shape, strict=True))
        return Box(starts, stops, self.source_shape)


def bounding_box(mask: np.ndarray, margin: int = 0) -> Box:
    """The smallest box holding every True voxel of ``mask`` (D, H, W), grown by ``margin`` voxels per side
    and clipped to the grid. An empty mask gives the whole grid (nothing to crop to)."""
    mask = np.asarray(mask, bool)
    shape = tuple(int(s) for s in mask.shape)
    if not mask.any():
        return Box((0,) * mask.ndim, shape, shape)
    starts, stops = [], []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        starts.append(int(hits[0]))
        stops.append(int(hits[-1]) + 1)
    return Box(tuple(starts), tuple(stops), shape).grown(margin)


def crop(volume: np.ndarray, box: Box) -> np.ndarray:
    """``volume`` (D, H, W[, C]) cut to ``box`` (a copy)."""
    if tuple(volume.shape[:3]) != box.source_shape:
        raise ValueError(f"volume {volume.shape} does not match the box's grid {box.source_shape}")
    return np.array(volume[box.slices])


def uncrop(volume: np.ndarray, box: Box, fill: float = 0.0) -> np.ndarray:
    """Inverse of ``crop``: put ``volume`` (box shape[, C]) back on the source grid, ``fill`` elsewhere."""
    out = np.full(box.source_shape + volume.shape[3:], fill, dtype=volume.dtype)
    out[box.slices] = volume
    return out


def shift_affine(affine: np.ndarray, offset: tuple[int, ...]) -> np.ndarray:
    """Affine of a grid whose voxel 0 is voxel ``offset`` (may be negative) of the grid of ``affine``."""
    out = np.array(affine, np.float64)
    out[:3, 3] = affine[:3, :3] @ np.asarray(offset, np.float64) + affine[:3, 3]
    return out


def pad_crop_offset(info: PadCrop) -> tuple[int, ...]:
    """Voxel of the original grid at voxel 0 of the ``pad_or_crop`` result (for ``shift_affine``)."""
    return tuple(c[0] - p[0] for c, p in zip(info.crops, info.pads, strict=True))


def resample(img, voxel_mm: float | tuple[float, float, float], order: int):
    """``img`` (nibabel) resampled to ``voxel_mm`` (mm, scalar or per axis) on a world-aligned grid.

    ``order`` 1 for images, 0 for labels and masks; the returned image's affine maps its voxels to the
    same world (scanner mm) coordinates as the input's, so an image and its labels resampled alike stay
    aligned voxel for voxel.
    """
    voxel = (float(voxel_mm),) * 3 if np.isscalar(voxel_mm) else tuple(float(v) for v in voxel_mm)
    return processing.resample_to_output(img, voxel_sizes=voxel, order=order, mode="constant", cval=0.0)


def voxelwise_stats(volumes, combine=None) -> tuple[np.ndarray, np.ndarray]:
    """Voxel-by-voxel mean and std (float32, (D, H, W)) over training volumes (each (D, H, W), same grid).

    Computed in float64 with one pass per volume (memory of two volumes, not all of them). Give it the
    TRAINING subjects only; std 0 is left as is (``voxelwise_zscore`` replaces it by 1). ``combine``
    maps the (sum, sum of squares, count) of ``volumes`` to those of all training volumes (a process's
    part summed over processes: ``distributed.sum_over_processes``); None: ``volumes`` are all of them.
    """
    total = squares = None
    count = 0
    for v in volumes:
        v = np.asarray(v, np.float64)
        if total is None:
            total, squares = np.zeros_like(v), np.zeros_like(v)
        elif v.shape != total.shape:
            raise ValueError(f"volumes differ in shape: {v.shape} and {total.shape}")
        total += v
        squares += v * v
        count += 1
    if combine is not None:
        total, squares, count = combine(total, squares, count)
    if not count:
        raise ValueError("voxelwise_stats needs at least one volume")
    mean = total / count
    var = np.maximum(squares / count - mean * mean, 0.0)
    return mean.astype(np.float32), np.sqrt(var).astype(np.float32)
