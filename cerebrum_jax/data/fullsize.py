"""A full-size cohort in the Schneider layout, for running the Schneider experiment's fold end to end at its
real resolution (0.63 mm, network grid 256 x 352 x 224, 8 classes) without the data record.

NOT 7T data, and not for accuracy: the pseudo-subjects of ``demo`` (nilearn's ICBM 2009a template under
random smooth deformations and intensity changes) sampled at ``VOXEL_MM``, with the Schneider record's
label values 1 white matter, 2 grey matter, 3 cerebrospinal fluid from the demo's tissue classes and
4 ventricles, 5 subcortical, 6 vessels, 7 sagittal sinus as geometric stand-ins (``extra_labels``), so
that every class of the Schneider label map occurs. Generated on demand (never committed):

    python -m cerebrum_jax.data.fullsize data/fullsize
    cerebrum-jax finetune --config schneider19 --data data/fullsize --grid 256,352,224 --epochs 1 \\
        --augment-views 1

Reuses a cohort whose manifest matches (see ``demo.ensure_demo_cohort``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

from cerebrum_jax.data import demo
from cerebrum_jax.data.labels import SCHNEIDER_LABELS

VOXEL_MM = 0.63  # the Schneider experiment's network grid spacing (0.63 x 0.625 x 0.625 mm)
N_SUBJECTS = 4  # as the record: 4-fold leave-one-out
SEED = 2  # pseudo-subjects distinct from the demo's (0) and its pretraining set (1)
README = """Full-size pseudo-cohort of cerebrum-jax (python -m cerebrum_jax.data.fullsize): the demo's
template-derived pseudo-subjects at 0.63 mm in the Schneider layout with all 7 Schneider label values (4-7
are geometric stand-ins). NOT 7T MRI data: for running the full-resolution experiment's mechanics only.
"""


def extra_labels(labels: np.ndarray, voxel_mm: float, seed: int) -> np.ndarray:
    """Labels 1-3 (X, Y, Z) uint8 -> with 4 ventricles (CSF in a central ellipsoid), 5 subcortical (grey
    matter in a smaller, lower one), 6 vessels (sparse blobs of a random field in the outer 3 mm of the
    brain) and 7 sagittal sinus (the top 4 mm of the brain within 3 mm of the mid-sagittal plane)."""
    out = labels.copy()
    brain = labels > 0
    idx = np.argwhere(brain)
    lo, hi = idx.min(0), idx.max(0)
    centre, half = (lo + hi) / 2.0, (hi - lo) / 2.0
    grid = np.ogrid[tuple(slice(0, s) for s in labels.shape)]
    r2 = sum(((g - c) / (0.18 * h)) ** 2 for g, c, h in zip(grid, centre, half, strict=True))
    out[(r2 < 1.0) & (labels == 3)] = 4
    low = [centre[0], centre[1], centre[2] - 0.15 * half[2]]
    r2 = sum(((g - c) / (0.22 * h)) ** 2 for g, c, h in zip(grid, low, half, strict=True))
    out[(r2 < 1.0) & (labels == 2)] = 5
    shell = brain & ~ndimage.binary_erosion(brain, iterations=max(1, round(3.0 / voxel_mm)))
    field = ndimage.gaussian_filter(
        np.random.default_rng(seed).normal(size=labels.shape).astype(np.float32), 2
    )
    out[shell & (field > 2.2 * field.std())] = 6
    top = np.zeros_like(brain)
    zmax = np.where(brain.any(axis=2), np.argmax(np.cumsum(brain, axis=2), axis=2), -1)  # top brain voxel
    mid = round(centre[0])
    w = round(3.0 / voxel_mm)
    depth = round(4.0 / voxel_mm)
    for x in range(mid - w, mid + w + 1):
        for y in np.nonzero(zmax[x] >= 0)[0]:
            top[x, y, max(0, zmax[x, y] - depth) : zmax[x, y] + 1] = True
    out[top & brain] = 7
    return out


def upsample2(image: np.ndarray, labels: np.ndarray, affine: np.ndarray):
    """A subject made at 2 x voxel_mm -> voxel_mm: each voxel split in 2 x 2 x 2 (labels as they are,
    the image then smoothed by a Gaussian of half a fine voxel), affine to match (same centres)."""
    up = lambda v: v.repeat(2, 0).repeat(2, 1).repeat(2, 2)  # noqa: E731
    fine = np.array(affine, np.float64)
    fine[:3, :3] /= 2.0
    fine[:3, 3] -= fine[:3, :3].sum(1) / 2.0  # fine voxels 2i, 2i + 1 straddle coarse voxel i's centre
    image = ndimage.gaussian_filter(up(image.astype(np.float32)), 0.5)
    return image, up(labels), fine


def build(root, *, n_subjects: int = N_SUBJECTS, voxel_mm: float = VOXEL_MM, seed: int = SEED) -> Path:
    """Build the cohort at ``root`` (``demo.write_cohort``: never half-written).

    Subjects are made at 2 x ``voxel_mm`` (the demo's recipe costs ~3 CPU-minutes per subject at 0.63 mm,
    8x less at 1.26 mm) and split into 2 x 2 x 2 voxels (``upsample2``): the network grid is full size,
    the anatomy's detail is 1.26 mm's."""

    def subjects():
        template = demo.load_template(2 * voxel_mm)
        for index in range(1, n_subjects + 1):
            image, labels, affine = demo.make_subject(template, index, seed)
            labels = extra_labels(labels, 2 * voxel_mm, seed * 1000 + index)
            yield (f"sub-{index:03d}", *upsample2(image, labels, affine))
            del image, labels

    params = _params(n_subjects, voxel_mm, seed)
    return demo.write_cohort(root, params, README, SCHNEIDER_LABELS, subjects())


def _params(n_subjects, voxel_mm, seed) -> dict:
    return {"kind": "fullsize", **demo._params(n_subjects, voxel_mm, seed)}


def ensure(root="data/fullsize", **kwargs) -> Path:
    """The cohort at ``root``, reused when intact (manifest and checksums), else built; a non-empty
    ``root`` without a manifest is never overwritten (InputError)."""
    params = _params(
        kwargs.get("n_subjects", N_SUBJECTS), kwargs.get("voxel_mm", VOXEL_MM), kwargs.get("seed", SEED)
    )
    return demo.ensure_cohort(root, params, lambda r: build(r, **kwargs), "a generated cohort")


if __name__ == "__main__":  # python -m cerebrum_jax.data.fullsize [ROOT]
    import sys

    print(ensure(*sys.argv[1:2]))
