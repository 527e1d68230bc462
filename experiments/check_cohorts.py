"""The cohorts of the few-label checks (``experiments/checks.py``), built from the demo's template.

NOT 7T data: the demo's pseudo-subjects (``cerebrum_jax.data.demo``: ICBM 2009a deformed, 3 mm) with
- ``vessels``: a fifth class, random branching vessel trees (radius 0.5-1.5 voxels) drawn at 4x the
  resolution and averaged down, so the image has the partial volume of a real acquisition (a voxel is
  "vessels" where the tube fills at least half of it; its intensity mixes tissue and bright blood by the
  filled fraction, as arteries are bright in MP2RAGE UNI): a few thousand voxels per volume;
- ``contrast``: the demo's T1-like contrast for every subject but the test subject of fold 3, whose
  brain has another contrast (grey matter brighter than white matter, CSF between) and a stronger bias.
Both are written in the Schneider layout with a manifest, reused while intact (``demo.ensure_cohort``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

from cerebrum_jax.data import demo
from cerebrum_jax.data.labels import LabelMap

VESSEL_LABELS = LabelMap.identity(
    ("background", "white matter", "grey matter", "cerebrospinal fluid", "vessels")
)
SHIFTED = {"wm": 0.45, "gm": 0.8, "csf": 0.6}  # the contrast-shift test subject: GM/WM inverted
BLOOD = 1.15  # blood / the 90th percentile of white matter: bright, but partial volume dims it
SUPER = 4  # vessels are drawn at SUPER times the resolution, then averaged down
VERSION = 2


def _grow(rng, start, direction, radius, inside, points, depth=0):
    """Append (centre (3,), radius) of one branch and its children to ``points`` (voxels): a curved
    segment of 10-25 voxels that tapers, stops outside ``inside`` (bool volume), and forks in two."""
    p, d = np.asarray(start, float), direction / np.linalg.norm(direction)
    for _ in range(int(rng.uniform(10, 25) / 0.25)):
        d = d + rng.normal(0, 0.08, 3)
        d /= np.linalg.norm(d)
        p = p + 0.25 * d
        idx = tuple(np.round(p).astype(int))
        if any(i < 0 or i >= s for i, s in zip(idx, inside.shape, strict=True)) or not inside[idx]:
            return
        points.append((p.copy(), radius))
        radius *= 0.995
    if radius * 0.75 >= 0.5 and depth < 6:
        for _ in range(2):
            turn = d + rng.normal(0, 0.6, 3)
            _grow(rng, p, turn, radius * 0.75, inside, points, depth + 1)


def vessel_fraction(rng, brain: np.ndarray, n_trees: int = 48) -> np.ndarray:
    """(X, Y, Z) float32 in [0, 1]: the share of each voxel filled by ``n_trees`` random vessel trees
    grown inside ``brain`` (bool), drawn at SUPER x the resolution and averaged down."""
    inside = ndimage.binary_erosion(brain, iterations=2)
    seeds = np.argwhere(inside)
    points = []
    for _ in range(n_trees):
        start = seeds[rng.integers(len(seeds))]
        _grow(rng, start, rng.normal(0, 1, 3), rng.uniform(0.9, 1.5), inside, points)
    fine = np.zeros(tuple(SUPER * s for s in brain.shape), bool)
    for centre, radius in points:
        c, r = (centre + 0.5) * SUPER - 0.5, radius * SUPER
        lo = np.maximum(np.floor(c - r).astype(int), 0)
        hi = np.minimum(np.ceil(c + r).astype(int) + 1, fine.shape)
        grid = np.ogrid[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))]
        ball = sum((g - ci) ** 2 for g, ci in zip(grid, c, strict=True)) <= r * r
        fine[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))] |= ball
    x, y, z = brain.shape
    return fine.reshape(x, SUPER, y, SUPER, z, SUPER).mean(axis=(1, 3, 5)).astype(np.float32)


def vessel_subject(template: dict, index: int, seed: int):
    """(image, labels in 0..4, affine): demo subject ``index`` with vessel trees (see the module)."""
    image, labels, affine = demo.make_subject(template, index, seed)
    rng = np.random.default_rng([seed, index, 7])
    f = vessel_fraction(rng, labels > 0)
    blood = BLOOD * np.percentile(image[labels == 1], 90)
    image = (1.0 - f) * image + f * blood
    labels = labels.copy()
    labels[f >= 0.5] = 4
    return image.astype(np.float32), labels, affine


def contrast_subject(template: dict, index: int, seed: int, shifted: bool):
    """(image, labels, affine): demo subject ``index``, its brain in the ``SHIFTED`` contrast with a
    +-35 % bias field when ``shifted``, else the demo's own."""
    if not shifted:
        return demo.make_subject(template, index, seed)
    return demo.make_subject(template, index, seed, contrast=SHIFTED, bias_sd=0.35)


def ensure_vessel_cohort(root: str | Path, n_subjects: int = 4, seed: int = 0) -> Path:
    """The vessel check's cohort at ``root`` (built on first use, reused while intact)."""
    params = {"check": "vessels", "version": VERSION, "n_subjects": n_subjects, "seed": seed}

    def build(path):
        template = demo.load_template(demo.VOXEL_MM)
        subjects = ((f"sub-{i:03d}", *vessel_subject(template, i, seed)) for i in range(1, n_subjects + 1))
        return demo.write_cohort(path, params, "vessel check (synthetic, NOT 7T)\n", VESSEL_LABELS, subjects)

    return demo.ensure_cohort(root, params, build, "a vessel-check cohort")


def ensure_contrast_cohort(root: str | Path, test_subject: int = 3, n_subjects: int = 4, seed: int = 0):
    """The contrast-shift check's cohort at ``root``: subject ``test_subject`` shifted, the others not."""
    params = {"check": "contrast", "version": VERSION, "n_subjects": n_subjects, "seed": seed}
    params["test_subject"] = test_subject

    def build(path):
        template = demo.load_template(demo.VOXEL_MM)
        subjects = (
            (f"sub-{i:03d}", *contrast_subject(template, i, seed, i == test_subject))
            for i in range(1, n_subjects + 1)
        )
        readme = "contrast-shift check (synthetic, NOT 7T)\n"
        return demo.write_cohort(path, params, readme, demo.DEMO_LABELS, subjects)

    return demo.ensure_cohort(root, params, build, "a contrast-check cohort")
