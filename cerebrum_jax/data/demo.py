"""The offline demo cohort: pseudo-subjects made from the ICBM 2009a template that nilearn ships.

NOT 7T data. Each pseudo-subject is the template (T1 and the grey/white-matter probability maps, read
from nilearn's wheel, no network) pushed through a distinct smooth random deformation (a random rigid
+ scaling part and a smooth displacement field) and distinct intensity changes (gamma contrast, gain,
smooth multiplicative bias field, Gaussian noise), sampled at ``voxel_mm`` (3 mm by default, so a fold
fine-tunes on a CPU in minutes). Labels use the Schneider record's source values:
0 background, 1 white matter, 2 grey matter, 3 cerebrospinal fluid. "Brain" is the template's brain mask
(its probability >= 0.5 after deformation); inside it, each voxel's class is the maximum a posteriori tissue
of the template's 1 mm T1 (a Gaussian intensity model per tissue, fitted by EM on the template, times the
template's tissue priors: GM and WM probability maps, CSF = the rest of the brain mask), the way SPM or
FSL FAST classify tissue; these posteriors are deformed with the image and the largest wins. (Plain priors,
the population probability maps, disagree with the template's own T1 at 3 mm: an intensity classifier
reached only 0.58 Dice on their CSF against 0.79 on the posteriors.) Written in the Schneider
Zenodo layout (so ``data.find_subjects`` reads it like the real record) with a manifest.json of sha256
checksums; the build is deterministic (fixed seeds, gzip without time stamps or names).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from cerebrum_jax.data.labels import DEMO_LABELS
from cerebrum_jax.errors import InputError
from cerebrum_jax.fsafe import atomic_path, replace_dir, write_text

VERSION = 2  # bump when the recipe changes: cohorts built by another version are rebuilt
N_SUBJECTS = 4
VOXEL_MM = 3.0
SEED = 0  # the fine-tuning cohort
PRETRAIN_SEED = 1  # a second, disjoint set of pseudo-subjects for pretraining the demo's weights
MARGIN_MM = 15.0  # room around the template's brain for the deformed brains
README = """Offline demo cohort of cerebrum-jax: pseudo-subjects derived from the ICBM 2009a template
shipped with nilearn (random smooth deformations and intensity changes). NOT 7T MRI data; for
demonstration and tests only. Labels: 0 background, 1 white matter, 2 grey matter, 3 cerebrospinal fluid.
"""


def ensure_demo_cohort(
    root: str | os.PathLike = "data/demo",
    *,
    n_subjects: int = N_SUBJECTS,
    voxel_mm: float = VOXEL_MM,
    seed: int = SEED,
) -> Path:
    """The demo cohort at ``root``: reused when its manifest matches these parameters and every file's
    sha256, else (re)built. Returns ``root``. A non-empty ``root`` without a manifest is not touched
    (InputError), so a real dataset is never overwritten."""
    build = functools.partial(build_demo_cohort, n_subjects=n_subjects, voxel_mm=voxel_mm, seed=seed)
    return ensure_cohort(root, _params(n_subjects, voxel_mm, seed), build, "a demo cohort")


def ensure_cohort(root: str | os.PathLike, params: dict, build, what: str) -> Path:
    """``root`` when it holds an intact generated cohort of ``params`` (manifest and every sha256), else
    ``build(root)``'s; a non-empty ``root`` without a manifest is never overwritten (InputError saying it
    is not ``what``)."""
    root = Path(root)
    if _is_intact(root, params):
        return root
    if root.exists() and any(root.iterdir()) and not (root / "manifest.json").exists():
        raise InputError(f"exists and is not {what} (no manifest.json); not overwriting it", root)
    build(root)
    return root


def ensure_pretrain_cohort(root: str | os.PathLike = "data/demo-pretrain", **kwargs) -> Path:
    """Pseudo-subjects for pretraining the demo's initial weights: same recipe, other seeds, so none of
    them is a fine-tuning (or test) subject. Use with ``labels.DEMO_PRETRAIN_LABELS``."""
    return ensure_demo_cohort(root, seed=PRETRAIN_SEED, **kwargs)


def build_demo_cohort(root, *, n_subjects=N_SUBJECTS, voxel_mm=VOXEL_MM, seed=SEED) -> Path:
    """Build the cohort at ``root`` (``write_cohort``: never half-written)."""

    def subjects():
        template = load_template(voxel_mm)
        for index in range(1, n_subjects + 1):
            yield (f"sub-{index:03d}", *make_subject(template, index, seed))

    return write_cohort(root, _params(n_subjects, voxel_mm, seed), README, DEMO_LABELS, subjects())


def write_cohort(root, params: dict, readme: str, label_map, subjects) -> Path:
    """Write a generated cohort in the Schneider layout, checksummed: each (id, image, labels, affine) of
    the iterable ``subjects`` (taken one at a time) as ``derivatives/<id>/unbiased/<id>_uni_unbiased.nii.gz``
    (float32) and ``derivatives/<id>/labeled/<id>_labels_v01.nii.gz`` (uint8), then README.txt (``readme``),
    dseg.tsv (of ``label_map``) and manifest.json ({"params": ``params``, "files": the sha256 of every
    file}). Built in a temporary folder beside ``root``, then swapped in (never half-written)."""
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        checksums = {}
        for sid, image, labels, affine in subjects:
            base = Path("derivatives") / sid
            rel = str(base / "unbiased" / f"{sid}_uni_unbiased.nii.gz")
            checksums[rel] = _write_nifti(tmp / rel, image.astype(np.float32), affine)
            rel = str(base / "labeled" / f"{sid}_labels_v01.nii.gz")
            checksums[rel] = _write_nifti(tmp / rel, labels.astype(np.uint8), affine)
            del image, labels
        for name, text in (("README.txt", readme), ("dseg.tsv", label_map.to_tsv())):
            write_text(tmp / name, text)
            checksums[name] = _sha256(tmp / name)
        manifest = {"params": params, "files": dict(sorted(checksums.items()))}
        write_text(tmp / "manifest.json", json.dumps(manifest, indent=2) + "\n")
        replace_dir(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


@functools.lru_cache(maxsize=2)  # a build and its tests reuse the smoothed maps (read-only use)
def load_template(voxel_mm: float = VOXEL_MM) -> dict:
    """nilearn's 1 mm ICBM 2009a maps, smoothed against aliasing at ``voxel_mm``, and the output grid.

    Returns dict: t1, brain and the tissue posteriors wm, gm, csf (``tissue_posteriors``) ((X, Y, Z)
    float32 at 1 mm, values 0..1), affine (template's 4x4), out_shape (3 ints) and out_affine (4x4,
    ``voxel_mm`` voxels covering the brain + ``MARGIN_MM``).
    """
    from nilearn import datasets  # imported here: slow, and only the demo needs it

    imgs = {
        "t1": datasets.load_mni152_template(resolution=1),
        "gm": datasets.load_mni152_gm_template(resolution=1),
        "wm": datasets.load_mni152_wm_template(resolution=1),
        "brain": datasets.load_mni152_brain_mask(resolution=1),
    }
    maps = {k: np.asarray(v.dataobj, np.float32) for k, v in imgs.items()}
    maps.update(tissue_posteriors(maps["t1"], maps["gm"], maps["wm"], maps["brain"]))
    sigma = 0.4 * voxel_mm  # about a Gaussian matched to the output voxel (in 1 mm template voxels)
    out = {k: ndimage.gaussian_filter(maps[k], sigma) for k in ("t1", "brain", "wm", "gm", "csf")}
    affine = np.array(imgs["t1"].affine, np.float64)
    hits = np.argwhere(np.asarray(imgs["brain"].dataobj) > 0)
    world = nib.affines.apply_affine(affine, np.stack([hits.min(0), hits.max(0)]))
    lo, hi = world.min(0) - MARGIN_MM, world.max(0) + MARGIN_MM
    out["out_shape"] = tuple(int(np.ceil(s)) for s in (hi - lo) / voxel_mm)
    out["out_affine"] = np.diag([voxel_mm, voxel_mm, voxel_mm, 1.0])
    out["out_affine"][:3, 3] = lo
    out["affine"] = affine
    return out


def tissue_posteriors(t1, gm, wm, brain, iterations: int = 5) -> dict:
    """MAP tissue classification of a T1 volume with tissue priors (all (X, Y, Z) float32 on one grid).

    Priors: wm, gm, and csf = brain - gm - wm (clipped to 0..1), each + 1e-3. Likelihood: one Gaussian
    per tissue, fitted by EM inside ``brain`` > 0.5 (first moments weighted by the priors, then by the
    posteriors, ``iterations`` times), as SPM's and FAST's tissue classifications do. Returns
    {"wm", "gm", "csf"}: posterior probabilities (sum 1 inside the brain mask, 0 outside).
    """
    inside = brain > 0.5
    x = t1[inside].astype(np.float64)
    priors = [p[inside].astype(np.float64) + 1e-3 for p in (wm, gm, np.clip(brain - gm - wm, 0.0, 1.0))]
    weights = priors
    for _ in range(iterations + 1):
        post = []
        for prior, w in zip(priors, weights, strict=True):
            mean = np.sum(w * x) / np.sum(w)
            sd = np.sqrt(np.sum(w * (x - mean) ** 2) / np.sum(w))
            post.append(prior * np.exp(-0.5 * ((x - mean) / sd) ** 2) / sd)
        total = np.sum(post, axis=0)
        weights = [p / total for p in post]
    out = {}
    for name, w in zip(("wm", "gm", "csf"), weights, strict=True):
        out[name] = np.zeros(t1.shape, np.float32)
        out[name][inside] = w
    return out


def make_subject(template: dict, index: int, seed: int = SEED, contrast: dict | None = None, bias_sd=0.15):
    """Pseudo-subject ``index`` -> (image (X, Y, Z) float32 >= 0, labels uint8 in {0,1,2,3}, affine 4x4).

    Randomness from numpy's generator seeded with (seed, index) only. ``contrast`` {"wm", "gm", "csf":
    intensity} replaces the template's T1 inside the brain by the tissue posteriors' mixture of those
    intensities (another contrast on the same anatomy; the head outside keeps the T1); ``bias_sd``: the
    log-gain sd of the bias field.
    """
    rng = np.random.default_rng([seed, index])
    shape, out_affine = template["out_shape"], template["out_affine"]
    coords = _source_voxels(rng, shape, out_affine, template["affine"])
    sample = {k: _sample(template[k], coords, shape) for k in ("t1", "wm", "gm", "csf", "brain")}
    tissues = np.stack([sample["wm"], sample["gm"], sample["csf"]])
    labels = (np.argmax(tissues, axis=0) + 1).astype(np.uint8)  # 1 WM, 2 GM, 3 CSF
    labels[sample["brain"] < 0.5] = 0
    if contrast is not None:
        brain = np.clip(sample["brain"], 0.0, 1.0)
        mix = sum(contrast[k] * sample[k] for k in ("wm", "gm", "csf")) / np.maximum(tissues.sum(0), 1e-6)
        sample["t1"] = brain * mix + (1.0 - brain) * sample["t1"]
    gamma = rng.uniform(0.7, 1.4)  # tissue contrast
    gain = rng.uniform(300.0, 1500.0)  # scanner units differ between sessions
    bias = np.exp(_smooth_field(rng, shape, 4, bias_sd))  # default +-15 %: slow multiplicative inhomogeneity
    noise = rng.normal(0.0, 0.02, shape)
    image = gain * np.clip(np.clip(sample["t1"], 0.0, None) ** gamma * bias + noise, 0.0, None)
    return image.astype(np.float32), labels, out_affine


def _source_voxels(rng, shape, out_affine, template_affine) -> np.ndarray:
    """(3, X, Y, Z) template voxel coordinates of each output voxel under a random smooth deformation."""
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij"), -1)
    world = nib.affines.apply_affine(out_affine, grid)  # (X, Y, Z, 3) mm
    centre = nib.affines.apply_affine(out_affine, (np.array(shape) - 1) / 2.0)
    angles = np.deg2rad(rng.uniform(-5.0, 5.0, 3))
    scales = rng.uniform(0.92, 1.08, 3)  # head size and shape
    matrix = _rotation(angles) @ np.diag(scales)
    shift = rng.uniform(-4.0, 4.0, 3)  # mm
    warp = np.stack([_smooth_field(rng, shape, 5, 3.0) for _ in range(3)], -1)  # mm, local shape changes
    source = (world - centre) @ matrix.T + centre + shift + warp
    voxels = nib.affines.apply_affine(np.linalg.inv(template_affine), source)
    return np.moveaxis(voxels, -1, 0)


def _rotation(angles) -> np.ndarray:
    ca, cb, cc = np.cos(angles)
    sa, sb, sc = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, ca, -sa], [0, sa, ca]])
    ry = np.array([[cb, 0, sb], [0, 1, 0], [-sb, 0, cb]])
    rz = np.array([[cc, -sc, 0], [sc, cc, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _smooth_field(rng, shape, points: int, sigma: float) -> np.ndarray:
    """A smooth random field on ``shape``: N(0, sigma) values on a points^3 grid, cubic-spline upsampled."""
    coarse = rng.normal(0.0, sigma, (points,) * 3)
    zoom = [(s - 1) / (points - 1) for s in shape]
    coords = np.stack(
        np.meshgrid(*[np.arange(s) / z for s, z in zip(shape, zoom, strict=True)], indexing="ij")
    )
    return ndimage.map_coordinates(coarse, coords, order=3, mode="nearest")


def _sample(volume: np.ndarray, coords: np.ndarray, shape) -> np.ndarray:
    return ndimage.map_coordinates(volume, coords.reshape(3, -1), order=1, mode="constant").reshape(shape)


def _write_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> str:
    """Write gzip-compressed NIfTI with no time stamp or file name in the gzip header; return sha256."""
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    img.set_data_dtype(data.dtype)
    payload = gzip.compress(img.to_bytes(), compresslevel=6, mtime=0)
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(payload)
    return hashlib.sha256(payload).hexdigest()


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _params(n_subjects, voxel_mm, seed) -> dict:
    return {"version": VERSION, "n_subjects": int(n_subjects), "voxel_mm": float(voxel_mm), "seed": int(seed)}


def _is_intact(root: Path, params: dict) -> bool:
    try:
        manifest = json.loads((root / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    if manifest.get("params") != params or not manifest.get("files"):
        return False
    return all(
        (root / rel).is_file() and _sha256(root / rel) == sha for rel, sha in manifest["files"].items()
    )


if __name__ == "__main__":  # python -m cerebrum_jax.data.demo [ROOT]: build (or check) the demo cohort
    import sys

    print(ensure_demo_cohort(*sys.argv[1:2]))
