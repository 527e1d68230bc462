"""Preprocessing: pure functions checked by round trips and independent computations (the subject-level
composition is tests/data/test_inputs.py)."""

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from cerebrum_jax.data import preprocess as pp

RNG = np.random.default_rng(0)


def _blob(shape=(16, 20, 12), centre=(8, 9, 6), radius=4.0):
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    return np.linalg.norm(grid - np.array(centre), axis=-1) <= radius


# ----------------------------------------------------------------------------------- existing core functions


@pytest.mark.parametrize(
    ("shape", "target"), [((10, 12, 7), (16, 8, 8)), ((8, 8, 8), (8, 8, 8)), ((5, 17, 9), None)]
)
def test_pad_or_crop_round_trip(shape, target):
    volume = RNG.normal(size=shape).astype(np.float32)
    target = target or pp.grid_for(shape)
    out, info = pp.pad_or_crop(volume, target)
    assert out.shape == tuple(target)
    back = pp.undo_pad_or_crop(out, info)
    kept = pp.undo_pad_or_crop(np.ones(target, bool), info)
    np.testing.assert_array_equal(back[kept], volume[kept])


def test_zscore_inside_mask():
    volume = RNG.normal(5.0, 3.0, (8, 8, 8)).astype(np.float32)
    mask = _blob((8, 8, 8), (4, 4, 4), 3)
    out = pp.zscore(volume, mask)
    assert abs(out[mask].mean()) < 1e-5 and abs(out[mask].std() - 1) < 1e-4


# ------------------------------------------------------------------------------------------- masks, boxes


@pytest.mark.parametrize("dilation", [0, 1, 3])
def test_mask_from_labels(dilation):
    labels = _blob().astype(np.int32) * 2
    mask = pp.mask_from_labels(labels, dilation)
    assert mask.dtype == bool and np.all(mask[labels > 0])
    # each dilation adds exactly the 6-neighbourhood shell
    expected = labels > 0
    for _ in range(dilation):
        expected = expected | ndimage.binary_dilation(expected, ndimage.generate_binary_structure(3, 1))
    np.testing.assert_array_equal(mask, expected)


@pytest.mark.parametrize(
    ("centre", "margin"), [((8, 9, 6), 0), ((8, 9, 6), 2), ((2, 2, 2), 5), ((14, 18, 10), 3)]
)
def test_bounding_box_crop_round_trip(centre, margin):
    mask = _blob(centre=centre, radius=2)
    box = pp.bounding_box(mask, margin)
    assert pp.bounding_box(mask).grown(margin) == box
    hits = np.argwhere(mask)
    for axis in range(3):
        assert box.starts[axis] == max(hits[:, axis].min() - margin, 0)
        assert box.stops[axis] == min(hits[:, axis].max() + 1 + margin, mask.shape[axis])
    volume = RNG.normal(size=mask.shape + (2,))
    cropped = pp.crop(volume, box)
    assert cropped.shape[:3] == box.shape
    back = pp.uncrop(cropped, box)
    np.testing.assert_array_equal(back[box.slices], volume[box.slices])
    assert pp.crop(mask, box).sum() == mask.sum()  # nothing of the mask is lost


def test_empty_mask_box_is_whole_grid():
    box = pp.bounding_box(np.zeros((4, 5, 6), bool), 2)
    assert box.shape == (4, 5, 6)


@pytest.mark.parametrize("offset", [(0, 0, 0), (3, -2, 5)])
def test_shift_affine(offset):
    affine = np.array([[0, -0.7, 0, 10], [0.6, 0, 0, -3], [0, 0, 0.8, 5], [0, 0, 0, 1]], float)
    voxel = np.array([1.0, 2.0, 3.0])
    moved = pp.shift_affine(affine, offset)
    np.testing.assert_allclose(
        nib.affines.apply_affine(moved, voxel), nib.affines.apply_affine(affine, voxel + offset)
    )


# -------------------------------------------------------------------------------------------- resampling


@pytest.mark.parametrize("voxel_mm", [2.0, (1.5, 2.0, 2.5)])
def test_resample_keeps_world_position(voxel_mm):
    mask = _blob((24, 24, 24), (10, 12, 14), 5)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = (-12, 4, 7)
    img = nib.Nifti1Image(mask.astype(np.float32) * 3, affine)
    out = pp.resample(img, voxel_mm, order=0)
    data = np.asarray(out.dataobj)
    assert set(np.unique(data)) <= {0.0, 3.0}  # order 0: no new label values
    np.testing.assert_allclose(np.sqrt((out.affine[:3, :3] ** 2).sum(0)), np.broadcast_to(voxel_mm, 3))

    def world_centre(d, a):
        return nib.affines.apply_affine(a, ndimage.center_of_mass(d > 0))

    np.testing.assert_allclose(world_centre(data, out.affine), world_centre(mask, affine), atol=1.0)


def test_voxelwise_stats():
    volumes = [RNG.normal(size=(4, 6, 8)) for _ in range(5)]
    mean, std = pp.voxelwise_stats(iter(volumes))
    assert mean.dtype == np.float32 and mean.shape == (4, 6, 8)
    np.testing.assert_allclose(mean, np.mean(volumes, axis=0), atol=1e-6)
    np.testing.assert_allclose(std, np.std(volumes, axis=0), atol=1e-5)
    with pytest.raises(ValueError, match="shape"):
        pp.voxelwise_stats([np.zeros((2, 2, 2)), np.zeros((2, 2, 3))])
