"""Segmentation metrics per class: Dice, 95th-percentile Hausdorff distance (mm), volumetric similarity.

All functions take label volumes (D, H, W) of integer values (compared as they are, no renumbering)
or boolean masks, and the voxel spacing in mm per axis (from the NIfTI header's zooms).

Empty classes (a class absent from one or both volumes), as defined here:

============================  ======  =====  ==============================================
case                          dice    vs     hd95
============================  ======  =====  ==============================================
absent from both              n/a     n/a    n/a (``None``; ``class_metrics`` sets "absent")
absent from exactly one       0.0     0.0    ``math.inf`` (``None`` / JSON null in evaluate)
============================  ======  =====  ==============================================

A class absent from both volumes has nothing to find and nothing to miss: it is not scored, and it is
left out of every mean (a fold's, the cross-validation summary's, the report's), rather than entering
them as a free 1.0. ``dice`` and ``volumetric_similarity`` alone still return 1.0 for two empty masks.

HD95 follows the MRBrainS18 evaluation: the surface of a mask is the mask minus its erosion (here a
3-D erosion with 6-connectivity, since 7T data are isotropic; MRBrainS18 eroded in-plane only for
its 3 mm slices), distances are Euclidean between voxel centres in mm, and the result is the larger
of the two directed 95th percentiles (numpy's default linear interpolation).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

BACKGROUND = 0


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """2 |P & R| / (|P| + |R|) of two boolean masks (same shape); 1.0 when both are empty."""
    pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
    total = int(pred.sum()) + int(ref.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(pred, ref).sum()) / total


def volumetric_similarity(pred: np.ndarray, ref: np.ndarray) -> float:
    """1 - | |P| - |R| | / (|P| + |R|) of two boolean masks; 1.0 when both are empty."""
    a, b = int(np.count_nonzero(pred)), int(np.count_nonzero(ref))
    return 1.0 if a + b == 0 else 1.0 - abs(a - b) / (a + b)


def surface(mask: np.ndarray) -> np.ndarray:
    """Boundary voxels (D, H, W) bool of ``mask``: voxels with a face neighbour outside (or at the edge)."""
    mask = np.asarray(mask, bool)
    return mask & ~ndimage.binary_erosion(mask, ndimage.generate_binary_structure(3, 1), border_value=0)


def _points_mm(mask: np.ndarray, spacing) -> np.ndarray:
    """Centres (N, 3) in mm of the surface voxels of ``mask`` (voxel index times spacing)."""
    return np.argwhere(surface(mask)) * np.asarray(spacing, np.float64)


def surface_distances(a: np.ndarray, b: np.ndarray, spacing) -> np.ndarray:
    """Distances in mm from every surface voxel of mask ``a`` to the nearest surface voxel of mask ``b``.

    Both masks must be non-empty. Exact nearest neighbours with a k-d tree, as the MRBrainS18
    evaluation (faster than a distance transform over the volume for brain-sized surfaces).
    """
    return _directed(_points_mm(a, spacing), _points_mm(b, spacing))


def _directed(pa: np.ndarray, pb: np.ndarray) -> np.ndarray:
    return cKDTree(pb).query(pa, k=1, workers=-1)[0]


def hd95(pred: np.ndarray, ref: np.ndarray, spacing) -> float:
    """Symmetric 95th-percentile Hausdorff distance in mm; 0.0 if both masks empty, inf if one is."""
    pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
    has_p, has_r = bool(pred.any()), bool(ref.any())
    if not (has_p or has_r):
        return 0.0
    if not (has_p and has_r):
        return math.inf
    pp, pr = _points_mm(pred, spacing), _points_mm(ref, spacing)
    return float(max(np.percentile(_directed(pp, pr), 95), np.percentile(_directed(pr, pp), 95)))


def class_metrics(pred: np.ndarray, ref: np.ndarray, spacing) -> dict:
    """{"dice", "hd95_mm", "vs", "voxels_pred", "voxels_ref", "absent"} of two boolean masks.

    absent: True when both masks are empty; dice, hd95_mm and vs are then None (n/a). hd95_mm is also
    None when exactly one mask is empty (infinite).
    """
    n_pred, n_ref = int(np.count_nonzero(pred)), int(np.count_nonzero(ref))
    counts = {"voxels_pred": n_pred, "voxels_ref": n_ref}
    if n_pred == 0 and n_ref == 0:
        return {"dice": None, "hd95_mm": None, "vs": None, **counts, "absent": True}
    h = hd95(pred, ref, spacing)
    return {
        "dice": dice(pred, ref),
        "hd95_mm": None if math.isinf(h) else h,
        "vs": volumetric_similarity(pred, ref),
        **counts,
        "absent": False,
    }


def evaluate(pred: np.ndarray, ref: np.ndarray, spacing, labels: dict[int, str]) -> dict:
    """Per-class metrics of label volumes ``pred`` and ``ref`` (D, H, W) with voxel ``spacing`` (mm, 3).

    ``labels`` maps label value -> class name. Returns a JSON-safe dict::

        {"classes": {name: {"label", "dice", "hd95_mm", "vs", "voxels_pred", "voxels_ref", "absent"}},
         "mean_dice": mean Dice over the classes other than background (value 0) that are present in
             the prediction or the reference (None if none is),
         "mean_hd95_mm": mean over those classes where HD95 is defined (None if none is),
         "mean_vs": mean volumetric similarity over the same classes as mean_dice,
         "n_a": names of the classes absent from both volumes (not scored),
         "spacing_mm": [3 floats]}
    """
    pred, ref = np.asarray(pred), np.asarray(ref)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    if len(tuple(spacing)) != pred.ndim:
        raise ValueError(f"spacing {tuple(spacing)} does not match {pred.ndim} dimensions")
    classes = {}
    for value, name in sorted(labels.items()):
        classes[name] = {"label": int(value), **class_metrics(pred == value, ref == value, spacing)}
    fg = [m for m in classes.values() if m["label"] != BACKGROUND and not m["absent"]]
    hds = [m["hd95_mm"] for m in fg if m["hd95_mm"] is not None]
    return {
        "classes": classes,
        "n_a": [name for name, m in classes.items() if m["absent"]],
        "mean_dice": float(np.mean([m["dice"] for m in fg])) if fg else None,
        "mean_hd95_mm": float(np.mean(hds)) if hds else None,
        "mean_vs": float(np.mean([m["vs"] for m in fg])) if fg else None,
        "spacing_mm": [float(s) for s in spacing],
    }


def format_table(result: dict) -> str:
    """A fixed-width text table of ``evaluate``'s result (one row per class, then the means)."""
    rows = [f"{'class':<20} {'label':>5} {'dice':>7} {'hd95_mm':>9} {'vs':>7}"]
    for name, m in result["classes"].items():
        dice_, vs = (f"{m[k]:.4f}" if m[k] is not None else "n/a" for k in ("dice", "vs"))
        hd = "n/a" if m.get("absent") else ("inf" if m["hd95_mm"] is None else f"{m['hd95_mm']:.3f}")
        rows.append(f"{name:<20} {m['label']:>5} {dice_:>7} {hd:>9} {vs:>7}")
    mean = result["mean_dice"]
    rows.append(f"{'mean (no background)':<20} {'':>5} {'n/a' if mean is None else f'{mean:.4f}':>7}")
    return "\n".join(rows)
