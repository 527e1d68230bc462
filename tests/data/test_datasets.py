"""Readers of the two layouts and leave-one-out folds, on real files in tmp_path."""

import nibabel as nib
import numpy as np
import pytest

from cerebrum_jax.data.datasets import Subject, find_subjects, split_fold
from cerebrum_jax.errors import InputError


def _nifti(path, shape=(4, 4, 4)):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.zeros(shape, np.float32), np.eye(4)), str(path))


def _schneider(root, ids, contrasts=("uni",)):
    for sid in ids:
        for c in contrasts:
            _nifti(root / "derivatives" / sid / "unbiased" / f"{sid}_{c}_unbiased.nii.gz")
        _nifti(root / "derivatives" / sid / "labeled" / f"{sid}_labels_v01.nii.gz")


def _bids(root, ids, seg="dseg"):
    for sid in ids:
        _nifti(root / sid / "anat" / f"{sid}_T1w.nii.gz")
        _nifti(root / sid / "seg" / f"{sid}_{seg}.nii.gz")
        _nifti(root / sid / "seg" / f"{sid}_brainmask.nii.gz")


# ------------------------------------------------------------------------------------------------- readers


@pytest.mark.parametrize("contrast", ["uni", "inv2", "t2s"])
@pytest.mark.parametrize("nested", [True, False])
def test_schneider_layout(tmp_path, contrast, nested):
    ids = ["sub-019", "sub-001", "sub-014"]
    _schneider(tmp_path, ids, ("uni", "inv2", "t2s"))
    root = tmp_path if nested else tmp_path / "derivatives"
    subjects = find_subjects(root, contrast=contrast)
    assert [s.id for s in subjects] == sorted(ids)
    for s in subjects:
        assert s.image.name == f"{s.id}_{contrast}_unbiased.nii.gz" and s.image.is_file()
        assert s.labels.name == f"{s.id}_labels_v01.nii.gz" and s.mask is None


@pytest.mark.parametrize("mask_name", [None, "brainmask"])
def test_bids_layout(tmp_path, mask_name):
    _bids(tmp_path, ["sub-b", "sub-a"], seg="aseg")
    subjects = find_subjects(tmp_path, seg_name="aseg", mask_name=mask_name)
    assert [s.id for s in subjects] == ["sub-a", "sub-b"]
    assert all(s.labels.name.endswith("_aseg.nii.gz") for s in subjects)
    assert all((s.mask is None) == (mask_name is None) for s in subjects)


@pytest.mark.parametrize(
    ("make", "kwargs", "message"),
    [
        (lambda r: _schneider(r, ["sub-001"]), {}, "at least 2"),
        (lambda r: _schneider(r, ["sub-001", "sub-002"]), {"contrast": "flair"}, "unknown contrast"),
        (
            lambda r: _schneider(r, ["sub-001", "sub-002"]),
            {"contrast": "t1"},
            "t1 image of sub-001 is missing",
        ),
        (lambda r: _bids(r, ["sub-1", "sub-2"]), {"seg_name": "labels"}, "labels label file of sub-1"),
        (lambda r: r.joinpath("x").mkdir(), {}, "no subjects found"),
        (lambda r: None, {"layout": "nifti"}, "unknown layout"),
    ],
)
def test_reader_errors(tmp_path, make, kwargs, message):
    make(tmp_path)
    with pytest.raises(InputError, match=message):
        find_subjects(tmp_path, **kwargs)


def test_missing_root(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        find_subjects(tmp_path / "absent")


# --------------------------------------------------------------------------------------------------- folds


def _subjects(n):
    return [Subject(f"sub-{i:03d}", f"i{i}", f"l{i}") for i in range(n, 0, -1)]  # unsorted on purpose


@pytest.mark.parametrize(("n", "fold"), [(2, 1), (2, 2), (4, 1), (4, 3), (4, 4), (5, 2)])
def test_split_fold(n, fold):
    train, val, test = split_fold(_subjects(n), fold)
    assert [s.id for s in test] == [f"sub-{fold:03d}"]
    assert sorted(s.id for s in train + test) == [f"sub-{i:03d}" for i in range(1, n + 1)]
    assert val == train and test[0] not in train


@pytest.mark.parametrize(("fold", "val_id"), [(3, "sub-001"), (1, "sub-004"), (4, "sub-002")])
def test_split_fold_val_subject(fold, val_id):
    train, val, test = split_fold(_subjects(4), fold, val_id)
    assert [s.id for s in val] == [val_id] and len(train) == 2
    assert {s.id for s in train} | {val_id} | {test[0].id} == {f"sub-00{i}" for i in range(1, 5)}


@pytest.mark.parametrize(
    ("n", "fold", "val_id", "message"),
    [
        (4, 0, None, "out of range"),
        (4, 5, None, "out of range"),
        (4, "3", None, "out of range"),
        (1, 1, None, "at least 2"),
        (4, 3, "sub-003", "test subject"),
        (4, 3, "sub-009", "no subject"),
        (2, 1, "sub-002", "at least 3"),
    ],
)
def test_split_fold_errors(n, fold, val_id, message):
    with pytest.raises(InputError, match=message):
        split_fold(_subjects(n), fold, val_id)
