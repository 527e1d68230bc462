"""3-D surfaces of label classes, manual and predicted, as on the CEREBRUM-7T project page.

For each chosen class, the boundary of the reference (manual) and of the predicted label is extracted by
marching cubes (scikit-image) from the class mask lightly smoothed (Gaussian, ``SMOOTH_SIGMA_VOX`` voxels,
iso-level 0.5), then mapped to world millimetres with the NIfTI affine, so the surfaces overlay the volume
in any viewer. A surface over ``max_faces`` triangles is re-extracted on a coarser marching-cubes step
(decimation that keeps a closed, regular mesh); the drawings use a coarser one (``RENDER_FACES``),
Taubin-smoothed.
Both are written as GIfTI
(``<prefix>_desc-<Class>_ref.surf.gii`` / ``_pred.surf.gii``: a NIFTI_INTENT_POINTSET in scanner mm and a
NIFTI_INTENT_TRIANGLE), readable by nibabel, freeview, Connectome Workbench and nilearn.

The predicted surface is compared with the reference surface by the signed distance of each predicted
vertex (mm): the distance to the nearest point of the full-resolution reference surface (its tangent plane
at the nearest vertex), negative when the vertex lies inside the reference label (prediction too thin or
small there), positive outside (too thick or large). Per class: mean signed, mean absolute and 95th
percentile of the absolute distance. The files of a comparison, with its drawings:
``report.surface_report`` (PNG and GIF by ``report.surface_views``, report.html's viewer by
``report.surface_viewer``).

Volumes are (D, H, W) label arrays in stored voxel order, sharing one grid and ``affine`` (4, 4).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree
from skimage.measure import marching_cubes

from cerebrum_jax.fsafe import atomic_path

DEFAULT_CLASSES = ("white matter", "grey matter", "vessels")
SMOOTH_SIGMA_VOX = 0.6  # Gaussian sigma (voxels) on the class mask before marching cubes
MAX_FACES = 100000  # triangles per surface written as GIfTI
RENDER_FACES = 20000  # triangles per surface drawn in the report and its 3-D viewer
_PAD = 2  # voxels of background around the cropped mask, so every surface closes


def class_tag(name: str) -> str:
    """BIDS ``desc`` label of a class name: alphanumeric camelCase ('white matter' -> 'whiteMatter')."""
    words = [w for w in re.split(r"[^A-Za-z0-9]+", name) if w]
    if not words:
        return "class"
    return words[0][0].lower() + words[0][1:] + "".join(w[0].upper() + w[1:] for w in words[1:])


def class_tags(classes: dict[int, str]) -> dict[int, str]:
    """{label value: desc label} of ``classes`` ({value: name}), one file name each: names whose tags
    collide (case aside, for case-insensitive file systems: 'white matter' and 'white-matter') get their
    label value appended ('whiteMatter1', 'whiteMatter7')."""
    tags = {v: class_tag(n) for v, n in classes.items()}
    counts: dict[str, int] = {}
    for t in tags.values():
        counts[t.lower()] = counts.get(t.lower(), 0) + 1
    return {v: f"{t}{v}" if counts[t.lower()] > 1 else t for v, t in tags.items()}


def resolve_classes(requested, names: dict[int, str], present=None) -> dict[int, str]:
    """{label value: name} of the classes to draw.

    ``requested``: class names or label values as strings (ValueError naming an unknown one); None: the
    ``DEFAULT_CLASSES`` that ``names`` has, or when it has none of them, every non-zero value in
    ``present`` (or in ``names``).
    """
    by_name = {n: k for k, n in names.items()}
    if requested:
        out = {}
        for item in requested:
            item = str(item).strip()
            if item in by_name:
                out[by_name[item]] = item
            elif item.lstrip("-").isdigit() and int(item) in names:
                out[int(item)] = names[int(item)]
            else:
                raise ValueError(f"unknown class {item!r}; known: {', '.join(names.values())}")
        return out
    out = {by_name[n]: n for n in DEFAULT_CLASSES if n in by_name}
    if out:
        return out
    values = sorted(present if present is not None else names)
    return {int(v): names.get(int(v), str(v)) for v in values if int(v) != 0}


def _crop_box(*masks: np.ndarray) -> tuple[slice, ...] | None:
    """The bounding box (slices) of the union of ``masks``; None when all are empty."""
    union = np.logical_or.reduce(masks)
    if not union.any():
        return None
    idx = np.nonzero(union)
    return tuple(slice(int(i.min()), int(i.max()) + 1) for i in idx)


def _field(mask: np.ndarray, box, sigma: float) -> np.ndarray:
    """The mask cropped to ``box``, padded by ``_PAD`` voxels and Gaussian-smoothed: float32 (d, h, w)."""
    sub = np.pad(np.asarray(mask[box], np.float32), _PAD)
    return ndimage.gaussian_filter(sub, sigma) if sigma > 0 else sub


def _marching(field: np.ndarray, step: int):
    """(verts (V, 3) voxel frame of ``field``, faces (F, 3) int32, normals (V, 3)); None if no surface."""
    if field.max() <= 0.5:
        return None
    verts, faces, normals, _ = marching_cubes(field, 0.5, step_size=step, allow_degenerate=False)
    return verts, faces.astype(np.int32), normals


def extract(field: np.ndarray, max_faces: int = MAX_FACES):
    """Marching cubes of ``field`` at 0.5 with at most ``max_faces`` triangles (coarser steps if needed).

    Returns (verts (V, 3), faces (F, 3), normals (V, 3), step) in the field's voxel frame, or None when
    the field never reaches 0.5 (an empty or sub-voxel class).
    """
    step, found = 1, _marching(field, 1)
    while found is not None and len(found[1]) > max_faces and step < 16:
        step = max(step + 1, math.ceil(step * math.sqrt(len(found[1]) / max_faces)))
        coarser = _marching(field, step)
        if coarser is None or len(coarser[1]) == 0:
            break
        found = coarser
    return None if found is None else (*found, step)


def to_world(verts_vox: np.ndarray, offset, affine) -> np.ndarray:
    """Voxel coordinates of a cropped frame (origin ``offset`` - ``_PAD``) -> world mm (V, 3) float64."""
    ijk = np.asarray(verts_vox, np.float64) + np.asarray(offset, np.float64) - _PAD
    a = np.asarray(affine, np.float64)
    return ijk @ a[:3, :3].T + a[:3, 3]


def _normals_world(normals_vox: np.ndarray, affine) -> np.ndarray:
    n = np.asarray(normals_vox, np.float64) @ np.linalg.inv(np.asarray(affine, np.float64)[:3, :3])
    return n / np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)


def signed_distance(points, ref_verts, ref_normals, ref_field, points_vox) -> np.ndarray:
    """Signed distance (mm) of world ``points`` (V, 3) to the reference surface.

    ref_verts / ref_normals: the full-resolution reference surface (world mm, unit normals); the magnitude
    is the distance to the tangent plane at the nearest reference vertex (never more than the distance to
    that vertex); the sign is negative where ``ref_field`` (the smoothed reference mask) sampled at
    ``points_vox`` (its voxel frame) exceeds 0.5, i.e. inside the reference.
    """
    d, idx = cKDTree(ref_verts).query(points)
    plane = np.abs(np.einsum("ij,ij->i", points - ref_verts[idx], ref_normals[idx]))
    mag = np.minimum(d, plane)
    inside = ndimage.map_coordinates(ref_field, np.asarray(points_vox).T, order=1, mode="nearest") > 0.5
    return np.where(inside, -mag, mag)


def taubin_smooth(verts: np.ndarray, faces: np.ndarray, iterations: int = 6) -> np.ndarray:
    """Taubin (lambda 0.5, mu -0.53) smoothing of a mesh's vertices (V, 3): removes the staircase of a
    coarse marching-cubes step without shrinking the surface; faces are unchanged."""
    n = len(verts)
    i = np.concatenate([faces[:, 0], faces[:, 1], faces[:, 2], faces[:, 1], faces[:, 2], faces[:, 0]])
    j = np.concatenate([faces[:, 1], faces[:, 2], faces[:, 0], faces[:, 0], faces[:, 1], faces[:, 2]])
    degree = np.maximum(np.bincount(i, minlength=n), 1)[:, None]
    v = np.asarray(verts, np.float64)
    for _ in range(iterations):
        for factor in (0.5, -0.53):
            mean = np.zeros_like(v)
            np.add.at(mean, i, v[j])
            v = v + factor * (mean / degree - v)
    return v


def distance_stats(dist: np.ndarray) -> dict:
    """Mean signed, mean absolute and 95th percentile of the absolute distance (mm)."""
    a = np.abs(dist)
    return {"mean": float(dist.mean()), "mean_abs": float(a.mean()), "p95_abs": float(np.percentile(a, 95))}


def _pair(fields: dict, offset, affine, max_faces: int, full_ref) -> dict | None:
    """Reference and predicted surfaces (world mm) of at most ``max_faces`` triangles each and the signed
    distance of the predicted vertices to ``full_ref`` (verts world, unit normals world); None if one is
    missing."""
    found = {key: extract(field, max_faces) for key, field in fields.items()}
    if found["ref"] is None or found["pred"] is None:
        return None
    out = {key: (to_world(f[0], offset, affine).astype(np.float32), f[1]) for key, f in found.items()}
    pred_vox = found["pred"][0]
    dist = signed_distance(to_world(pred_vox, offset, affine), *full_ref, fields["ref"], pred_vox)
    out["distance"], out["step"] = dist.astype(np.float32), {k: f[3] for k, f in found.items()}
    return out


def compare_class(
    ref_labels, pred_labels, value: int, affine, max_faces: int = MAX_FACES, render_faces: int = RENDER_FACES
) -> dict:
    """Surfaces of label ``value`` in the reference and the prediction, and their signed distance.

    Returns dict: ref / pred ((verts (V, 3) world mm float32, faces (F, 3) int32), at most ``max_faces``
    triangles, or None when the class is empty there), distance ((V_pred,) mm or None), stats
    (``distance_stats`` or None), step (marching-cubes step of each), view (the same at most
    ``render_faces`` triangles, for drawing; None without both surfaces) and note (one line when a
    surface is missing, else None).
    """
    ref_mask, pred_mask = np.asarray(ref_labels) == value, np.asarray(pred_labels) == value
    out = {"ref": None, "pred": None, "distance": None, "stats": None, "step": {}, "view": None, "note": None}
    box = _crop_box(ref_mask, pred_mask)
    if box is None:
        out["note"] = "absent from both the reference and the prediction: no surface"
        return out
    offset = [s.start for s in box]
    fields = {
        "ref": _field(ref_mask, box, SMOOTH_SIGMA_VOX),
        "pred": _field(pred_mask, box, SMOOTH_SIGMA_VOX),
    }
    full = _marching(fields["ref"], 1)  # the full-resolution reference surface, for the distances
    full_ref = None if full is None else (to_world(full[0], offset, affine), _normals_world(full[2], affine))
    got = _pair(fields, offset, affine, max_faces, full_ref) if full is not None else None
    if got is None:
        for key, field in fields.items():
            found = extract(field, max_faces)
            if found is not None:
                out[key], out["step"][key] = (
                    (to_world(found[0], offset, affine).astype(np.float32), found[1]),
                    found[3],
                )
        where = {"ref": "the reference", "pred": "the prediction"}
        missing = [where[k] for k in ("ref", "pred") if out[k] is None]
        out["note"] = f"empty (or below one voxel) in {' and '.join(missing)}: no comparison"
        return out
    out.update(got, stats=distance_stats(got["distance"]))
    small = max(len(got["ref"][1]), len(got["pred"][1])) <= render_faces
    view = dict(got) if small else _pair(fields, offset, affine, render_faces, full_ref)
    for key in ("ref", "pred"):  # drawn smooth; the colours keep the distances of the unsmoothed vertices
        view[key] = (taubin_smooth(*view[key]).astype(np.float32), view[key][1])
    out["view"] = view
    return out


def write_gifti(path, verts: np.ndarray, faces: np.ndarray, meta: dict | None = None) -> Path:
    """A surface GIfTI: vertices (V, 3) float32 in scanner mm (NIFTI_XFORM_SCANNER_ANAT) and triangles."""
    coords = nib.gifti.GiftiDataArray(
        np.asarray(verts, np.float32),
        intent="NIFTI_INTENT_POINTSET",
        datatype="NIFTI_TYPE_FLOAT32",
        coordsys=nib.gifti.GiftiCoordSystem(3, 3, np.eye(4)),
    )
    tris = nib.gifti.GiftiDataArray(
        np.asarray(faces, np.int32), intent="NIFTI_INTENT_TRIANGLE", datatype="NIFTI_TYPE_INT32"
    )
    img = nib.gifti.GiftiImage(darrays=[coords, tris], meta=nib.gifti.GiftiMetaData(meta or {}))
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return Path(path)


def read_gifti(path) -> tuple[np.ndarray, np.ndarray]:
    """(vertices (V, 3) float32 mm, faces (F, 3) int32) of a surface GIfTI."""
    img = nib.load(str(path))
    points = img.get_arrays_from_intent("NIFTI_INTENT_POINTSET")[0].data
    tris = img.get_arrays_from_intent("NIFTI_INTENT_TRIANGLE")[0].data
    return np.asarray(points, np.float32), np.asarray(tris, np.int32)
