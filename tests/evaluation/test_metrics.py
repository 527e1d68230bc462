"""Metrics against independent brute-force computations, and the evaluate command on real NIfTI files."""

import json
import math

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import cdist

from cerebrum_jax.cli import main
from cerebrum_jax.evaluation import metrics


def blob(shape, seed, threshold=0.0):
    """A random smooth blob mask (bool) on ``shape``."""
    noise = np.random.default_rng(seed).normal(size=shape)
    return ndimage.gaussian_filter(noise, 2.0) > threshold


def labels(shape, seed, n=4):
    """A random smooth label volume with values 0..n-1."""
    field = ndimage.gaussian_filter(np.random.default_rng(seed).normal(size=shape), 2.0)
    edges = np.quantile(field, np.linspace(0, 1, n + 1)[1:-1])
    return np.digitize(field, edges).astype(np.int64)


def brute_surface(mask):
    """Voxels of ``mask`` with at least one of their 6 face neighbours outside it (outside the array too)."""
    padded = np.pad(mask, 1, constant_values=False)
    inner = np.ones_like(mask)
    for axis in range(3):
        for shift in (-1, 1):
            inner &= np.roll(padded, shift, axis=axis)[1:-1, 1:-1, 1:-1]
    return mask & ~inner


def brute_hd95(a, b, spacing):
    pa = np.argwhere(brute_surface(a)) * np.asarray(spacing)
    pb = np.argwhere(brute_surface(b)) * np.asarray(spacing)
    d = cdist(pa, pb)
    return max(np.percentile(d.min(axis=1), 95), np.percentile(d.min(axis=0), 95))


CASES = [
    ((12, 14, 10), (0.7, 0.5, 1.2), 0),
    ((16, 9, 13), (1.0, 1.0, 1.0), 1),
    ((10, 18, 11), (0.63, 0.625, 0.625), 2),
    ((8, 8, 20), (2.0, 0.3, 0.9), 3),
]


@pytest.mark.parametrize("shape,spacing,seed", CASES)
def test_hd95_matches_brute_force(shape, spacing, seed):
    a, b = blob(shape, seed), blob(shape, seed + 100)
    assert a.any() and b.any() and not np.array_equal(a, b)
    assert np.array_equal(metrics.surface(a), brute_surface(a))
    assert metrics.hd95(a, b, spacing) == pytest.approx(brute_hd95(a, b, spacing), rel=1e-6)
    assert metrics.hd95(a, b, spacing) == pytest.approx(metrics.hd95(b, a, spacing), rel=1e-12)


@pytest.mark.parametrize("shape,spacing,seed", CASES)
def test_dice_and_vs_match_counts(shape, spacing, seed):
    a, b = blob(shape, seed), blob(shape, seed + 7, threshold=0.05)
    na, nb, both = a.sum(), b.sum(), (a & b).sum()
    assert metrics.dice(a, b) == pytest.approx(2 * both / (na + nb))
    assert metrics.volumetric_similarity(a, b) == pytest.approx(1 - abs(na - nb) / (na + nb))
    assert metrics.dice(a, a) == 1.0 and metrics.hd95(a, a, spacing) == 0.0


def test_shifted_cube_hd95_is_the_shift_in_mm():
    a = np.zeros((20, 20, 20), bool)
    a[5:12, 5:12, 5:12] = True
    b = np.roll(a, 3, axis=2)
    # Every surface voxel of a moves 3 voxels along axis 2 (2.5 mm each); the 95th percentile of the
    # directed distances is at most that and at least one voxel.
    hd = metrics.hd95(a, b, (0.5, 0.5, 2.5))
    assert hd == pytest.approx(brute_hd95(a, b, (0.5, 0.5, 2.5)))
    assert 2.5 <= hd <= 7.5


@pytest.mark.parametrize(
    "pred_empty,ref_empty,dice,vs,hd",
    [(True, True, 1.0, 1.0, 0.0), (True, False, 0.0, 0.0, math.inf), (False, True, 0.0, 0.0, math.inf)],
)
def test_empty_classes(pred_empty, ref_empty, dice, vs, hd):
    full = blob((10, 10, 10), 5)
    pred = np.zeros_like(full) if pred_empty else full
    ref = np.zeros_like(full) if ref_empty else full
    assert metrics.dice(pred, ref) == dice
    assert metrics.volumetric_similarity(pred, ref) == vs
    assert metrics.hd95(pred, ref, (1, 1, 1)) == hd
    m = metrics.class_metrics(pred, ref, (1, 1, 1))
    assert m["absent"] == (pred_empty and ref_empty)
    if m["absent"]:  # nothing to find or miss: n/a, not a free 1.0
        assert m["dice"] is None and m["vs"] is None and m["hd95_mm"] is None
    else:
        assert m["hd95_mm"] == (None if math.isinf(hd) else hd) and m["dice"] == dice


def test_evaluate_structure_mean_and_json_safety():
    ref = labels((14, 12, 10), 0)
    pred = labels((14, 12, 10), 1)
    names = {0: "background", 1: "csf", 2: "gm", 3: "wm", 9: "absent"}
    pred[pred == 3] = 2  # class wm missing from the prediction: dice 0, hd95 undefined
    r = metrics.evaluate(pred, ref, (0.7, 0.7, 0.7), names)
    assert list(r["classes"]) == ["background", "csf", "gm", "wm", "absent"]
    assert r["classes"]["wm"]["hd95_mm"] is None and r["classes"]["wm"]["dice"] == 0.0
    assert r["classes"]["absent"] == {
        "label": 9, "dice": None, "hd95_mm": None, "vs": None, "voxels_pred": 0, "voxels_ref": 0,
        "absent": True,
    }  # fmt: skip
    assert r["n_a"] == ["absent"]
    for value, name in names.items():
        if value != 9:
            assert r["classes"][name]["dice"] == pytest.approx(metrics.dice(pred == value, ref == value))
    fg = [r["classes"][n]["dice"] for v, n in names.items() if v not in (0, 9)]  # n/a left out
    assert r["mean_dice"] == pytest.approx(np.mean(fg))
    assert r["mean_vs"] == pytest.approx(np.mean([r["classes"][n]["vs"] for n in ("csf", "gm", "wm")]))
    assert json.loads(json.dumps(r, allow_nan=False)) == r


def write_labels(path, data, zooms=(0.7, 0.5, 1.2), dtype=np.uint8):
    affine = np.diag([*zooms, 1.0])
    affine[:3, 3] = (-10.0, 4.0, 2.5)
    nib.save(nib.Nifti1Image(np.asarray(data).astype(dtype), affine), str(path))
    return path


def test_evaluate_cli_table_and_json(tmp_path, capsys):
    ref, pred = labels((12, 14, 10), 2), labels((12, 14, 10), 3)
    write_labels(tmp_path / "ref.nii.gz", ref)
    write_labels(tmp_path / "pred.nii.gz", pred)
    (tmp_path / "dseg.tsv").write_text("index\tname\n0\tbackground\n1\tcsf\n2\tgm\n3\twm\n")
    out = tmp_path / "m.json"
    argv = ["evaluate", str(tmp_path / "pred.nii.gz"), str(tmp_path / "ref.nii.gz")]
    assert main([*argv, "--labels", str(tmp_path / "dseg.tsv"), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    result = json.loads(out.read_text())
    expected = metrics.evaluate(pred, ref, (0.7, 0.5, 1.2), {0: "background", 1: "csf", 2: "gm", 3: "wm"})
    assert result["mean_dice"] == pytest.approx(expected["mean_dice"])
    for name in ("background", "csf", "gm", "wm"):
        assert name in text
        assert result["classes"][name]["hd95_mm"] == pytest.approx(expected["classes"][name]["hd95_mm"])
    # Without a table the values found are the names.
    assert main(argv) == 0
    assert "3" in capsys.readouterr().out


@pytest.mark.parametrize(
    "problem,message",
    [
        ("shape", "of the reference"),
        ("float", "non-integer"),
        ("outside", "not in"),
        ("missing", "does not exist"),
        ("tsv", "header"),
        ("spacing", "voxel size"),
        ("origin", "affine (orientation/origin) differs"),
        ("orientation", "affine (orientation/origin) differs"),
    ],
)
def test_evaluate_cli_errors(tmp_path, capsys, problem, message):
    ref = labels((10, 10, 10), 4)
    pred = ref.copy()
    zooms = (0.7, 0.5, 1.2)
    dtype = np.uint8
    tsv = "index\tname\n0\tbg\n1\ta\n2\tb\n3\tc\n"
    if problem == "shape":
        pred = pred[:, :, :8]
    elif problem == "float":
        pred, dtype = pred + 0.5, np.float32
    elif problem == "outside":
        tsv = "index\tname\n0\tbg\n1\ta\n"
    elif problem == "tsv":
        tsv = "value,label\n0,bg\n"
    elif problem == "spacing":
        zooms = (1.0, 1.0, 1.0)
    write_labels(tmp_path / "ref.nii.gz", ref)
    if problem != "missing":
        write_labels(tmp_path / "pred.nii.gz", pred, zooms, dtype)
    if problem in ("origin", "orientation"):  # same shape and voxel size, other place or axis direction
        affine = nib.load(tmp_path / "pred.nii.gz").affine
        if problem == "origin":
            affine[:3, 3] += (0.0, 0.01, 0.0)
        else:
            affine[0, 0] *= -1
        nib.save(nib.Nifti1Image(pred.astype(dtype), affine), str(tmp_path / "pred.nii.gz"))
    (tmp_path / "l.tsv").write_text(tsv)
    out = tmp_path / "m.json"
    argv = ["evaluate", str(tmp_path / "pred.nii.gz"), str(tmp_path / "ref.nii.gz"), "--json", str(out)]
    assert main([*argv, "--labels", str(tmp_path / "l.tsv")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_evaluate_cli_accepts_affine_within_tolerance(tmp_path, capsys):
    ref = labels((10, 10, 10), 4)
    write_labels(tmp_path / "ref.nii.gz", ref)
    affine = nib.load(tmp_path / "ref.nii.gz").affine
    affine[:3, 3] += 1e-4  # float rounding of a header round trip, far below a voxel
    nib.save(nib.Nifti1Image(ref.astype(np.uint8), affine), str(tmp_path / "pred.nii.gz"))
    assert main(["evaluate", str(tmp_path / "pred.nii.gz"), str(tmp_path / "ref.nii.gz")]) == 0
    assert "affine" not in capsys.readouterr().err
