"""Centre lines of thin classes (vessels): the training target of the skeleton recall loss and the
centre-line metrics of the few-label checks. Host-side numpy / scikit-image, once per volume.

Skeleton recall (Kirchhoff et al., "Skeleton Recall Loss for Connectivity Conserving and Resource
Efficient Segmentation of Thin Tubular Structures", ECCV 2024): the reference's skeleton, thickened by
one voxel ("tubed", so that a one-voxel offset of a thin prediction is not all-or-nothing) and kept
inside its class, is computed once per training volume; the loss (``losses.skeleton_recall_loss``) is the
soft recall of it. Chosen over clDice (Shit et al., CVPR 2021), which needs a soft skeleton of the
*prediction* (iterated min/max pooling) at every step: Kirchhoff et al. report equal or better
connectivity scores at a fraction of the memory and time, and the tubed reference travels through the
same spatial augmentation as the labels (``augment.augment_views``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from skimage.morphology import skeletonize

# Class names taken for vessel-like (thin, tubular) classes when skeleton_classes is automatic.
VESSEL_LIKE = re.compile(r"vessel|sinus|arter|vein|venous|vascul", re.IGNORECASE)


def vessel_like_classes(names: Sequence[str]) -> tuple[int, ...]:
    """Indices (>= 1) of the class ``names`` that name vessel-like structures (``VESSEL_LIKE``)."""
    return tuple(i for i, name in enumerate(names) if i > 0 and VESSEL_LIKE.search(name))


def skeleton_of(mask: np.ndarray) -> np.ndarray:
    """The 3-D skeleton (Lee et al. 1994, scikit-image) of a boolean mask (D, H, W), as bool. A
    connected component that thinning removes entirely (a compact blob: scikit-image leaves nothing of
    a solid even-sided cube) keeps its deepest voxel, so that every component has a centre."""
    mask = np.asarray(mask, bool)
    if not mask.any():
        return np.zeros(mask.shape, bool)
    skel = skeletonize(mask).astype(bool)
    components, n = ndimage.label(mask, ndimage.generate_binary_structure(3, 3))
    kept = np.unique(components[skel])
    missing = np.setdiff1d(np.arange(1, n + 1), kept)
    if missing.size:
        depth = ndimage.distance_transform_edt(mask)
        for position in ndimage.maximum_position(depth, components, missing):
            skel[position] = True
    return skel


def tubed_skeleton(labels: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """(D, H, W) uint8, 1 on the tubed skeleton of each class of ``classes`` in ``labels`` (D, H, W) int:
    its skeleton dilated by one voxel (6-neighbourhood) and kept inside the class, so each marked voxel's
    class is its label's."""
    labels = np.asarray(labels)
    out = np.zeros(labels.shape, np.uint8)
    cross = ndimage.generate_binary_structure(3, 1)
    for k in classes:
        mask = labels == k
        tube = ndimage.binary_dilation(skeleton_of(mask), cross) & mask
        out[tube] = 1
    return out


def centreline_scores(pred: np.ndarray, ref: np.ndarray) -> dict:
    """Centre-line agreement of two boolean masks (D, H, W), JSON-safe: {"cl_recall": the share of the
    reference's skeleton inside ``pred`` (clDice's topology sensitivity), "cl_precision": the share of the
    prediction's skeleton inside ``ref``, "cldice": their harmonic mean (Shit et al. 2021)}; None where
    a skeleton is empty (nothing to find, or nothing predicted)."""
    pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
    s_ref, s_pred = skeleton_of(ref), skeleton_of(pred)
    recall = float((s_ref & pred).sum() / s_ref.sum()) if s_ref.any() else None
    precision = float((s_pred & ref).sum() / s_pred.sum()) if s_pred.any() else None
    cldice = None
    if recall is not None and precision is not None:
        cldice = 2 * recall * precision / (recall + precision) if recall + precision > 0 else 0.0
    return {"cl_recall": recall, "cl_precision": precision, "cldice": cldice}
