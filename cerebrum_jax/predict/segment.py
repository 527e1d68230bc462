"""Whole-volume segmentation of arrays: ``segment(volume, params, config)``, the library's entry to the one
prediction path (``predictor``) for parameters without a checkpoint's preprocessing record.

Volumes are (D, H, W) numpy arrays in the voxel order of their NIfTI file; the network sees them
as (1, D', H', W', 1) with D', H', W' multiples of 8 (``preprocess.grid_for``), or, with voxelwise
normalisation, on the grid of the mean/std volumes. The whole volume goes through the network at once,
as in the original; on a CPU the full-resolution layers run in depth slabs (``lean.probabilities_lean``,
the same function), which bounds memory and is faster there.
"""

from __future__ import annotations

import numpy as np

from cerebrum_jax.data import inputs
from cerebrum_jax.data.inputs import Preprocessing
from cerebrum_jax.model.network import ModelConfig
from cerebrum_jax.predict.predictor import forward_fn, labels_from, predict_volume

NORMALIZATIONS = inputs.NORMALIZATIONS
__all__ = ["NORMALIZATIONS", "forward_fn", "labels_from", "prepare", "preprocessing_for", "segment"]


def preprocessing_for(normalization: str = "zscore", norm_volumes=None, mask=None) -> Preprocessing:
    """The ``Preprocessing`` of a bare array call: the whole volume, masked when ``mask`` is given,
    ``normalization`` ("voxelwise": on the grid of ``norm_volumes``)."""
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, not {normalization!r}")
    grid = None
    if normalization == "voxelwise":
        if norm_volumes is None:
            raise ValueError("voxelwise normalization needs norm_volumes={'mean', 'std'}")
        grid = np.shape(norm_volumes["mean"])
    return Preprocessing(mask="none" if mask is None else "file", grid=grid, normalization=normalization)


def prepare(volume: np.ndarray, *, normalization="zscore", norm_volumes=None, mask=None):
    """(network input (D', H', W') float32, ``preprocess.PadCrop`` to undo the grid change) of ``volume``
    (D, H, W): ``inputs.prepare`` with ``preprocessing_for``. zscore: statistics of the whole volume, or
    inside ``mask`` (D, H, W) bool, outside which the image is then 0; voxelwise: padded with zeros /
    cropped to the mean/std volumes' grid, then normalised voxel by voxel (std 0 -> 1); none: padded."""
    volume = np.asarray(volume, np.float32)
    if volume.ndim != 3:
        raise ValueError(f"volume must be 3-D (D, H, W), got shape {volume.shape}")
    pre = preprocessing_for(normalization, norm_volumes, mask)
    x, geom, _ = inputs.prepare(volume, mask, pre, norm_volumes)
    return x, geom.padcrop


def segment(
    volume: np.ndarray,
    params: dict,
    config: ModelConfig,
    *,
    normalization: str = "zscore",
    norm_volumes: dict | None = None,
    mask: np.ndarray | None = None,
    mesh=None,
    tta_axes=(),
) -> np.ndarray:
    """Class probabilities (D, H, W, n_classes) float32 of a whole volume (D, H, W).

    ``normalization``: "zscore" (per volume; statistics inside ``mask`` (D, H, W) bool when given, and
    the image set to 0 outside it), "voxelwise" (``norm_volumes`` {"mean", "std"} of the training set,
    whose shape sets the grid) or "none". Voxels cropped away to fit a smaller voxelwise grid come back
    as background (probability 1 for class 0). Labels are ``labels_from(probs)``.
    ``mesh``: a ``jax.sharding.Mesh`` (``sharding.make_mesh``) to split the forward along depth over its
    devices (the grid's depth / 8 must divide by the mesh's "space" size, else ValueError); None: one
    device. ``tta_axes``: average over the mirrored copies along these axes (``predictor.mirror_sets``).
    A checkpoint with a preprocessing record goes through ``predictor.predict`` instead.
    """
    volume = np.asarray(volume, np.float32)
    if volume.ndim != 3:
        raise ValueError(f"volume must be 3-D (D, H, W), got shape {volume.shape}")
    pre = preprocessing_for(normalization, norm_volumes, mask)
    return predict_volume(
        params, config, pre, volume, np.eye(4), mask, norm_volumes, tta_axes=tta_axes, mesh=mesh
    )
