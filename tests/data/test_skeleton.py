"""Centre lines: the tubed skeleton (the skeleton recall target) and the centre-line scores."""

import numpy as np
import pytest

from cerebrum_jax.data import skeleton


def _tube(shape=(20, 24, 24), radius=2.0, axis_centre=(12, 12)):
    """A straight tube along axis 0 (class 2) inside a box of class 1."""
    labels = np.ones(shape, np.int32)
    yy, xx = np.ogrid[: shape[1], : shape[2]]
    disc = (yy - axis_centre[0]) ** 2 + (xx - axis_centre[1]) ** 2 <= radius**2
    labels[2:-2][:, disc] = 2
    return labels


@pytest.mark.parametrize(
    "names, expected",
    [
        (["background", "white matter", "vessels", "sagittal sinus"], (2, 3)),
        (["background", "Arteries", "veins", "grey matter"], (1, 2)),
        (["vessels", "white matter"], ()),  # the background is never a thin class
        (["background", "white matter", "grey matter"], ()),
    ],
)
def test_vessel_like_classes(names, expected):
    assert skeleton.vessel_like_classes(names) == expected


def test_tubed_skeleton_is_the_centre_line_thickened_and_kept_in_its_class():
    labels = _tube()
    tube = skeleton.tubed_skeleton(labels, [2])
    assert tube.dtype == np.uint8 and set(np.unique(tube)) == {0, 1}
    assert np.all(labels[tube == 1] == 2)  # inside the class it belongs to
    centre = skeleton.skeleton_of(labels == 2)
    assert centre.sum() > 0 and np.all(tube[centre] == 1)  # covers the skeleton
    assert centre[:, 12, 12].sum() >= 10  # the skeleton of a straight tube is its axis
    assert 3 * centre.sum() < tube.sum() < (labels == 2).sum()  # one voxel thicker, not the whole tube
    assert not skeleton.tubed_skeleton(labels, []).any()
    assert not skeleton.tubed_skeleton(np.zeros((8, 8, 8), np.int32), [1]).any()


@pytest.mark.parametrize(
    "case, recall, precision",
    [
        ("same", 1.0, 1.0),
        ("disjoint", 0.0, 0.0),
        ("half", 0.5, 1.0),  # the prediction covers half the reference's length
        ("empty prediction", 0.0, None),
        ("empty reference", None, 0.0),
    ],
)
def test_centreline_scores(case, recall, precision):
    ref = _tube() == 2
    pred = {
        "same": ref,
        "disjoint": _tube(axis_centre=(4, 4), radius=1.5) == 2,
        "half": ref & (np.arange(ref.shape[0]) < ref.shape[0] // 2)[:, None, None],
        "empty prediction": np.zeros_like(ref),
        "empty reference": ref,
    }[case]
    if case == "empty reference":
        ref = np.zeros_like(ref)
    got = skeleton.centreline_scores(pred, ref)
    for name, want in (("cl_recall", recall), ("cl_precision", precision)):
        if want is None:
            assert got[name] is None
        else:
            assert got[name] == pytest.approx(want, abs=0.15), (name, got)
    if recall is not None and precision is not None:
        both = got["cl_recall"] + got["cl_precision"]
        expected = 2 * got["cl_recall"] * got["cl_precision"] / both if both else 0.0
        assert got["cldice"] == pytest.approx(expected)
    else:
        assert got["cldice"] is None


def test_every_component_keeps_a_centre():
    """scikit-image thins a solid cube away completely; such a component keeps its deepest voxel."""
    mask = np.zeros((16, 16, 16), bool)
    mask[2:6, 2:6, 2:6] = True  # a cube
    mask[8:14, 10, 10] = True  # a line: its own skeleton
    skel = skeleton.skeleton_of(mask)
    assert skel[2:6, 2:6, 2:6].sum() == 1 and skel[8:14, 10, 10].sum() >= 4
    assert not skel[~mask].any()
