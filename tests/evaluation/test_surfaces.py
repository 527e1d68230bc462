"""Surfaces of label classes: marching cubes in world mm, GIfTI round trip, signed distances, images, CLI."""

import json

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from scipy.spatial import cKDTree

from cerebrum_jax.cli import main
from cerebrum_jax.evaluation import surfaces
from cerebrum_jax.report import surface_report

SPACING = np.array([1.0, 1.5, 2.0])


def rotated_affine(spacing=SPACING, origin=(-40.0, 12.0, 7.5)) -> np.ndarray:
    """Voxel -> mm: scaling by ``spacing``, a rotation about z by 30 degrees and about x by 10, a shift."""
    a, b = np.radians(30), np.radians(10)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    out = np.eye(4)
    out[:3, :3] = rz @ rx @ np.diag(spacing)
    out[:3, 3] = origin
    return out


def ball(shape, centre_vox, radius_mm, spacing=SPACING) -> np.ndarray:
    """Boolean (D, H, W): voxel centres within ``radius_mm`` of ``centre_vox`` (distances in mm)."""
    g = np.indices(shape).astype(float)
    d = (g - np.asarray(centre_vox, float)[:, None, None, None]) * np.asarray(spacing)[:, None, None, None]
    return np.sqrt((d**2).sum(0)) < radius_mm


def world(affine, ijk):
    return np.asarray(ijk, float) @ affine[:3, :3].T + affine[:3, 3]


def test_gifti_of_a_sphere_has_its_radius_in_mm(tmp_path):
    shape, centre = (48, 32, 24), (23.5, 15.5, 11.5)
    labels = ball(shape, centre, 18.0).astype(np.uint8)
    affine = rotated_affine()
    recs = surface_report.write_class_surfaces(
        tmp_path, "sub-01", labels, labels, affine, {1: "white matter"}, render=False
    )
    assert recs[0]["files"] == {
        "ref": "sub-01_desc-whiteMatter_ref.surf.gii",
        "pred": "sub-01_desc-whiteMatter_pred.surf.gii",
    }
    verts, faces = surfaces.read_gifti(tmp_path / recs[0]["files"]["ref"])
    img = nib.load(tmp_path / recs[0]["files"]["ref"])
    assert img.darrays[0].coordsys.dataspace == 3  # NIFTI_XFORM_SCANNER_ANAT: world mm
    r = np.linalg.norm(verts - world(affine, centre), axis=1)
    assert abs(r.mean() - 18.0) < 0.5 and r.std() < 0.5  # the voxelised ball's edge lies within half a voxel
    assert faces.max() < len(verts) and len(faces) > 500
    # identical volumes: every predicted vertex lies on the reference surface
    assert recs[0]["distance_mm"]["mean_abs"] < 0.05 and recs[0]["distance_mm"]["p95_abs"] < 0.1


def test_surface_lies_within_a_voxel_of_the_label_boundary(tmp_path):
    shape = (40, 36, 30)
    mask = ball(shape, (15, 16, 14), 14.0) | ball(shape, (25, 20, 15), 11.0)
    mask[18:22, 10:30, 5:12] = True  # a slab sticking out: edges and corners, not only round parts
    affine = rotated_affine()
    labels = np.where(mask, 2, 0).astype(np.uint8)
    surface_report.write_class_surfaces(
        tmp_path, "x", labels, labels, affine, {2: "grey matter"}, render=False
    )
    verts, _ = surfaces.read_gifti(tmp_path / "x_desc-greyMatter_ref.surf.gii")
    idx = np.indices(shape).reshape(3, -1).T
    inside, outside = world(affine, idx[mask.ravel()]), world(affine, idx[~mask.ravel()])
    d_in, _ = cKDTree(inside).query(verts)
    d_out, _ = cKDTree(outside).query(verts)
    boundary = (d_out - d_in) / 2  # ~ distance to the face between inside and outside voxel centres
    assert np.abs(boundary).max() <= SPACING.max()


def test_signed_distance_sign_and_size():
    shape, c = (40, 40, 40), (19.5, 19.5, 19.5)
    one = np.ones(3)
    ref = ball(shape, c, 10.0, one).astype(np.uint8)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    bigger = surfaces.compare_class(ref, ball(shape, c, 12.0, one).astype(np.uint8), 1, affine)
    smaller = surfaces.compare_class(ref, ball(shape, c, 8.0, one).astype(np.uint8), 1, affine)
    assert abs(bigger["stats"]["mean"] - 2.0) < 0.3 and bigger["distance"].min() > 0
    assert abs(smaller["stats"]["mean"] + 2.0) < 0.3 and smaller["distance"].max() < 0
    assert smaller["stats"]["p95_abs"] >= smaller["stats"]["mean_abs"] > 1.5


def test_decimation_keeps_a_closed_mesh_under_the_budget():
    field = surfaces._field(ball((60, 60, 60), (30, 30, 30), 25.0, np.ones(3)), (slice(0, 60),) * 3, 0.6)
    verts, faces, _, step = surfaces.extract(field, max_faces=2000)
    assert len(faces) <= 2000 and step > 1
    edges = {tuple(sorted(e)) for f in faces.tolist() for e in ((f[0], f[1]), (f[1], f[2]), (f[0], f[2]))}
    used = len(np.unique(faces))
    assert used - len(edges) + len(faces) == 2  # Euler characteristic of a sphere: closed, no holes


def test_empty_class_is_one_line_not_a_crash(tmp_path):
    ref = ball((20, 20, 20), (10, 10, 10), 6.0, np.ones(3)).astype(np.uint8)
    pred = np.zeros_like(ref)
    recs = surface_report.write_class_surfaces(
        tmp_path, "s", ref, pred, np.eye(4), {1: "white matter", 6: "vessels"}, frames=2
    )
    assert recs[0]["distance_mm"] is None and "prediction" in recs[0]["note"]
    assert set(recs[0]["files"]) == {"ref"} and "absent from both" in recs[1]["note"]
    md = surface_report.surfaces_markdown(recs)
    assert "- white matter: empty (or below one voxel) in the prediction" in md
    assert json.loads((tmp_path / "surfaces.json").read_text())[1]["class"] == "vessels"


def test_renderings_are_valid_images_and_viewer_data(tmp_path):
    shape = (24, 24, 24)
    ref = ball(shape, (12, 12, 12), 8.0, np.ones(3)).astype(np.uint8)
    pred = ball(shape, (12, 13, 12), 8.0, np.ones(3)).astype(np.uint8)
    recs = surface_report.write_class_surfaces(tmp_path, "s", ref, pred, np.eye(4), {1: "vessels"}, frames=3)
    png = Image.open(tmp_path / recs[0]["files"]["png"])
    gif = Image.open(tmp_path / recs[0]["files"]["gif"])
    assert png.format == "PNG" and gif.format == "GIF" and gif.n_frames == 3
    viewer = json.loads((tmp_path / recs[0]["files"]["viewer"]).read_text())  # the 3-D viewer's meshes
    assert {"ref", "pred", "centre", "half", "limit"} <= set(viewer) and "distance" in viewer["pred"]
    pixels = np.asarray(png.convert("RGB"))
    assert (pixels.min(axis=2) < 200).mean() > 0.05  # surfaces drawn, not a blank page
    assert recs[0]["distance_mm"]["mean"] == pytest.approx(0.0, abs=0.3)  # shifted by 1 mm: both signs


def test_class_names_and_choice():
    assert surfaces.class_tag("white matter") == "whiteMatter"
    assert surfaces.class_tag("grey matter+cerebrospinal fluid") == "greyMatterCerebrospinalFluid"
    names = {0: "background", 1: "white matter", 2: "grey matter", 3: "cerebrospinal fluid"}
    assert surfaces.resolve_classes(None, names) == {1: "white matter", 2: "grey matter"}
    assert surfaces.resolve_classes(["3", "grey matter"], names) == {
        3: "cerebrospinal fluid",
        2: "grey matter",
    }
    assert surfaces.resolve_classes(None, {0: "0", 4: "4"}, [0, 4]) == {4: "4"}
    with pytest.raises(ValueError, match="unknown class 'vessels'"):
        surfaces.resolve_classes(["vessels"], names)


def _save(path, data, affine=None):
    nib.save(nib.Nifti1Image(np.asarray(data, np.uint8), np.eye(4) if affine is None else affine), path)
    return str(path)


@pytest.mark.slow
def test_surfaces_command(tmp_path, capsys):
    shape = (24, 24, 24)
    ref = ball(shape, (12, 12, 12), 9.0, np.ones(3)).astype(np.uint8) + ball(
        shape, (12, 12, 12), 5.0, np.ones(3)
    )
    pred = np.roll(ref, 1, axis=0)
    (tmp_path / "dseg.tsv").write_text("index\tname\n1\tgrey matter\n2\twhite matter\n")  # no row for 0
    p = _save(tmp_path / "sub-01_space-orig_desc-cerebrum_dseg.nii.gz", pred)
    r = _save(tmp_path / "ref.nii.gz", ref)
    out = tmp_path / "surf"
    assert main(["surfaces", p, r, "--out", str(out), "--frames", "2"]) == 0
    assert "white matter" in capsys.readouterr().out
    stem = "sub-01_space-orig_desc-"
    for name in (f"{stem}whiteMatter_ref.surf.gii", f"{stem}greyMatter_pred.surf.gii",
                 f"{stem}whiteMatter_turntable.gif", "surfaces.md", "report.html"):  # fmt: skip
        assert (out / name).is_file(), name
    assert main(["surfaces", p, r, "--out", str(out), "--classes", "vessels"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown class 'vessels'" in err
    shifted = np.eye(4)
    shifted[0, 3] = 5.0
    moved = _save(tmp_path / "moved.nii.gz", ref, shifted)
    assert main(["surfaces", p, moved, "--out", str(out)]) == 2
    assert "affine" in capsys.readouterr().err
