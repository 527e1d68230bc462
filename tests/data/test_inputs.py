"""Input preparation shared by training and prediction: Preprocessing records, foreground, prepare's
geometry round trips, and load_subject on real NIfTI files in tmp_path."""

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from cerebrum_jax.data import inputs
from cerebrum_jax.data.datasets import Subject
from cerebrum_jax.data.inputs import Preprocessing
from cerebrum_jax.data.labels import DEMO_LABELS, SCHNEIDER_LABELS
from cerebrum_jax.errors import InputError

RNG = np.random.default_rng(0)


def _blob(shape=(16, 20, 12), centre=(8, 9, 6), radius=4.0):
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    return np.linalg.norm(grid - np.array(centre), axis=-1) <= radius


def _write(path, data, affine):
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))
    return path


def _subject(tmp_path, labels_shape=None, labels_affine=None, values=(1, 2, 3), mask=False):
    affine = np.array([[0.9, 0, 0, -20], [0, 1.1, 0, 5], [0, 0, 1.0, 3], [0, 0, 0, 1]])
    shape = (20, 24, 18)
    blob = _blob(shape, (10, 11, 9), 6)
    labels = np.where(blob, RNG.choice(values, size=shape), 0).astype(np.int16)
    image = (labels * 100 + RNG.normal(0, 5, shape)).astype(np.float32)
    if labels_shape:
        labels = np.zeros(labels_shape, np.int16)
    m = _write(tmp_path / "mask.nii.gz", ndimage.binary_dilation(blob, iterations=2).astype(np.uint8), affine)
    return Subject(
        "sub-001",
        _write(tmp_path / "img.nii.gz", image, affine),
        _write(tmp_path / "lab.nii.gz", labels, affine if labels_affine is None else labels_affine),
        m if mask else None,
    )


# ------------------------------------------------------------------------------------- records, foreground


@pytest.mark.parametrize(
    "pre",
    [
        Preprocessing(),
        Preprocessing(mask="file", crop="box", margin=2, grid=(8, 16, 24), voxel_mm=0.7),
        Preprocessing(mask="labels", crop="box", normalization="voxelwise", grid=(8, 8, 8)),
    ],
)
def test_preprocessing_record_round_trip(pre):
    import json

    assert Preprocessing.from_dict(json.loads(json.dumps(pre.to_dict()))) == pre
    assert pre.needs_mask == (pre.mask != "none") and pre.describe()


def test_unknown_preprocessing_is_refused():
    with pytest.raises(ValueError):
        Preprocessing(mask="skull")


def test_foreground_is_the_head_not_the_noise():
    head = _blob((24, 24, 24), (12, 12, 12), 8)
    image = np.where(head, 500.0, 0.0) + RNG.normal(0, 5, head.shape)
    image[2, 2, 2] = 400.0  # one bright noise voxel far from the head
    fg = inputs.foreground(image)
    assert not fg[2, 2, 2] and (fg == head).mean() > 0.99


@pytest.mark.parametrize("shape", [(20, 24, 18), (9, 31, 16)])
@pytest.mark.parametrize("crop", ["none", "box"])
def test_prepare_geometry_round_trip(shape, crop):
    """Whatever the crop and grid, to_source(to_grid(v)) gives back every voxel the grid covers, and the
    grid's affine puts each grid voxel where its source voxel lies."""
    head = _blob(shape, tuple(s // 2 for s in shape), min(shape) / 3)
    image = np.where(head, 300.0, 1.0).astype(np.float32)
    pre = Preprocessing(crop=crop, margin=1)
    x, geom, region = inputs.prepare(image, None, pre)
    assert x.shape == geom.grid and all(g % 8 == 0 for g in x.shape) and region.shape == x.shape
    covered = geom.to_source(np.ones(x.shape, bool), False)
    back = geom.to_source(geom.to_grid(image), 0.0)
    np.testing.assert_array_equal(back[covered], image[covered])
    assert covered[head].all()
    src_affine = np.diag([0.7, 0.8, 0.9, 1.0])
    vox = np.argwhere(geom.to_grid(head, False))[:5]
    world = nib.affines.apply_affine(geom.affine(src_affine), vox)
    source_vox = np.rint(nib.affines.apply_affine(np.linalg.inv(src_affine), world)).astype(int)
    assert head[tuple(source_vox.T)].all()


@pytest.mark.parametrize(
    ("crop", "margin", "grid", "cut"),
    [
        ("box", 1, None, None),  # the grid is the box rounded up: nothing cut
        ("box", 1, (16, 16, 16), None),  # box 11x11x11 (the blob's 9 + margin 1 per side) fits
        ("box", 1, (8, 16, 16), (1, 0, 0)),  # 3 of the 11 rows cut, 1 of them the head's
        ("box", 4, (16, 16, 16), None),  # box 16x17x12 (margins clipped at the edges): only margin cut
        ("none", 0, (16, 24, 16), None),  # the whole 16x20x12 volume fits
        ("none", 0, (16, 16, 16), (0, 4, 0)),  # height 20 > 16
    ],
)
def test_cut_note_only_when_the_grid_cuts_into_the_head(crop, margin, grid, cut):
    image = np.where(_blob(), 300.0, 1.0).astype(np.float32)
    pre = Preprocessing(crop=crop, margin=margin, grid=grid)
    _, geom, _ = inputs.prepare(image, None, pre)
    note = inputs.cut_note(geom, pre)
    assert (note is not None) == (cut is not None)
    if cut:
        assert f"grid {'x'.join(map(str, geom.grid))}" in note
        assert f"{'/'.join(map(str, cut))} voxel rows" in note


@pytest.mark.parametrize(
    ("trained", "spacing", "voxel_mm", "warned"),
    [
        (None, (1.0, 1.0, 1.0), None, False),  # not recorded (a converted or older checkpoint)
        ((0.63, 0.63, 0.63), (0.7, 0.63, 0.6), None, False),  # within 25 %
        ((3.0, 3.0, 3.0), (1.0, 1.0, 1.0), None, True),  # the demo model on a 1 mm head
        ((0.63, 0.63, 0.63), (0.63, 0.63, 1.0), None, True),  # one axis is enough
        ((3.0, 3.0, 3.0), (1.0, 1.0, 1.0), 3.0, False),  # the model resamples its inputs itself
    ],
)
def test_spacing_note(trained, spacing, voxel_mm, warned):
    note = inputs.spacing_note(trained, spacing, Preprocessing(voxel_mm=voxel_mm))
    assert (note is not None) == warned
    if warned:
        assert "resample" in note and "x".join(f"{z:.2g}" for z in trained) in note


def test_voxel_size_of_a_rotated_affine():
    c, s = np.cos(0.4), np.sin(0.4)
    affine = np.eye(4)
    affine[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.diag([0.7, 0.63, 0.9])
    np.testing.assert_allclose(inputs.voxel_size(affine), (0.7, 0.63, 0.9))


def test_prepare_with_mask_zeroes_outside_and_normalises_inside():
    image = RNG.normal(100, 20, (16, 16, 16)).astype(np.float32)
    mask = _blob((16, 16, 16), (8, 8, 8), 5)
    x, _, region = inputs.prepare(image, mask, Preprocessing(mask="file", crop="box"))
    assert abs(x[region].mean()) < 1e-4 and abs(x[region].std() - 1) < 1e-3
    assert np.unique(x[~region]).size == 1  # the zeroed outside, normalised with the same statistics


# ------------------------------------------------------------------------------------------- load_subject


@pytest.mark.parametrize(
    ("grid", "voxel_mm", "mask"),
    [(None, None, "labels"), ((24, 24, 24), None, "labels"), (None, 2.0, "file"), (None, None, "none")],
)
def test_load_subject(tmp_path, grid, voxel_mm, mask):
    subject = _subject(tmp_path, mask=mask == "file")
    pre = Preprocessing(mask=mask, crop="box", margin=1, grid=grid, voxel_mm=voxel_mm, normalization="none")
    out = inputs.load_subject(subject, DEMO_LABELS, pre)
    shape = out.image.shape
    assert all(s % 8 == 0 for s in shape) and (grid is None or shape == grid)
    assert out.image.dtype == np.float32 and out.labels.dtype == np.int32 and out.mask.dtype == bool
    assert out.labels.shape == shape == out.mask.shape
    if mask != "none":  # the mask holds every labelled voxel, and the image is 0 outside it
        assert np.all(out.mask[out.labels > 0]) and np.all(out.image[~out.mask] == 0)
    else:  # the foreground (opened: an edge voxel may drop out) holds nearly all of them
        assert out.mask[out.labels > 0].mean() > 0.97
    if voxel_mm is not None:
        np.testing.assert_allclose(out.spacing, voxel_mm)
        return
    # each output voxel lies where the same source voxel lies in the world, with its mapped label
    labels = nib.load(str(subject.labels))
    src = np.asarray(labels.dataobj)
    inside = np.argwhere(out.labels > 0)
    world = nib.affines.apply_affine(out.affine, inside)
    source_vox = np.rint(nib.affines.apply_affine(np.linalg.inv(labels.affine), world)).astype(int)
    np.testing.assert_array_equal(DEMO_LABELS.apply(src[tuple(source_vox.T)]), out.labels[tuple(inside.T)])
    back = out.geometry.to_source(out.labels, 0)
    np.testing.assert_array_equal(back, DEMO_LABELS.apply(src))


def test_unmasked_preparation_never_reads_the_labels(tmp_path):
    """mask "none": the network input is the same whatever the label file says."""
    subject = _subject(tmp_path)
    pre = Preprocessing(crop="box", margin=1)
    a = inputs.load_subject(subject, DEMO_LABELS, pre)
    _write(
        subject.labels,
        np.zeros(nib.load(str(subject.labels)).shape, np.int16),
        nib.load(subject.labels).affine,
    )
    b = inputs.load_subject(subject, DEMO_LABELS, pre)
    np.testing.assert_array_equal(a.image, b.image)
    assert a.labels.any() and not b.labels.any()


@pytest.mark.parametrize(
    ("kwargs", "pre", "message"),
    [
        ({"labels_shape": (20, 24, 17)}, {}, "differs from .* of .*img.nii.gz"),
        ({"labels_affine": np.diag([1.0, 1.0, 2.0, 1.0])}, {}, "voxel size .* differs .* of .*img.nii.gz"),
        ({"values": (1, 9)}, {}, "label values 9 are not in the label map"),
        ({}, {"grid": (20, 24, 24)}, "multiples of 8"),
        ({}, {"mask": "file"}, "needs a brain mask"),
    ],
)
def test_load_subject_errors(tmp_path, kwargs, pre, message):
    subject = _subject(tmp_path, **kwargs)
    with pytest.raises(InputError, match=message):
        inputs.load_subject(subject, DEMO_LABELS, Preprocessing(**{"mask": "labels", "crop": "box", **pre}))


def test_load_subject_schneider_values(tmp_path):
    subject = _subject(tmp_path, values=(1, 5, 7))
    out = inputs.load_subject(subject, SCHNEIDER_LABELS.drop(7), Preprocessing(mask="labels", crop="box"))
    assert set(np.unique(out.labels)) == {0, 1, 5}
