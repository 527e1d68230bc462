"""Label maps, readers of the two layouts and leave-one-out folds, on real files in tmp_path."""

import nibabel as nib
import numpy as np
import pytest

from cerebrum_jax.data import (
    DEMO_LABELS,
    DEMO_PRETRAIN_LABELS,
    SCHNEIDER_LABELS,
    SCHNEIDER_REDUCED_LABELS,
    LabelMap,
    Subject,
    edit_label_map,
    find_subjects,
    get_label_map,
    split_fold,
)
from cerebrum_jax.errors import InputError

MAPS = [SCHNEIDER_LABELS, SCHNEIDER_REDUCED_LABELS, DEMO_LABELS, DEMO_PRETRAIN_LABELS]


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


# ---------------------------------------------------------------------------------------------- label maps


def test_schneider_sets():
    assert SCHNEIDER_LABELS.n_classes == 8 and SCHNEIDER_REDUCED_LABELS.n_classes == 7
    assert "sagittal sinus" not in SCHNEIDER_REDUCED_LABELS.names
    assert SCHNEIDER_REDUCED_LABELS.apply(np.array([7]))[0] == 0
    assert DEMO_PRETRAIN_LABELS.n_classes == DEMO_LABELS.n_classes - 1


@pytest.mark.parametrize("label_map", MAPS)
def test_apply_agrees_with_sources(label_map):
    values = np.array([v for v, _ in label_map.sources] * 3).reshape(3, -1)
    out = label_map.apply(values.astype(np.float32))
    assert out.dtype == np.int32 and out.shape == values.shape
    lookup = dict(label_map.sources)
    assert all(out.flat[i] == lookup[int(v)] for i, v in enumerate(values.flat))
    assert set(np.unique(out)) == set(range(label_map.n_classes))


@pytest.mark.parametrize("label_map", MAPS)
def test_tsv_round_trip(label_map, tmp_path):
    path = tmp_path / "map.tsv"
    path.write_text(label_map.to_source_tsv())
    assert LabelMap.from_tsv(path) == label_map
    label_map.to_tsv(tmp_path / "dseg.tsv")
    rows = [line.split("\t") for line in (tmp_path / "dseg.tsv").read_text().splitlines()]
    assert rows[0] == ["index", "name"] and [r[1] for r in rows[1:]] == list(label_map.names)


@pytest.mark.parametrize(
    ("drop", "merge", "n_classes", "probe", "same_class"),
    [
        (["7"], [], 7, 7, 0),
        (["6,7"], [], 6, 6, 0),
        ([], ["3,4"], 7, 4, 3),
        ([], ["3,4=fluid"], 7, 3, 4),
        (["7"], ["1,5"], 6, 5, 1),
    ],
)
def test_edits(drop, merge, n_classes, probe, same_class):
    edited = edit_label_map(SCHNEIDER_LABELS, drop, merge)
    out = edited.apply(np.array([probe, same_class]))
    assert edited.n_classes == n_classes and out[0] == out[1]
    assert all(n in edited.names for n in ("background", "grey matter"))


def test_merge_name():
    assert "fluid" in edit_label_map(SCHNEIDER_LABELS, merge=["3,4=fluid"]).names


@pytest.mark.parametrize(
    ("drop", "merge", "message"),
    [
        (["9"], [], "cannot drop"),
        ([], ["3"], "cannot merge"),
        ([], ["0,3"], "background"),
        (["x"], [], "drop"),
    ],
)
def test_bad_edits(drop, merge, message):
    with pytest.raises(InputError, match=message):
        edit_label_map(SCHNEIDER_LABELS, drop, merge)


@pytest.mark.parametrize(
    ("values", "message"), [([0, 1, 9], "9"), ([0, 4, 5], "4, 5"), ([0.5], "non-integer")]
)
def test_apply_rejects_unknown_values(values, message):
    with pytest.raises(InputError, match=message) as err:
        DEMO_LABELS.apply(np.array(values), "sub-001_labels.nii.gz")
    assert str(err.value).startswith("sub-001_labels.nii.gz: ")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name\tvalue\nbg\t0\n", "columns"),
        ("index\tname\n0\tbg\n2\twm\n", "0..1"),
        ("index\tname\n0\tbg\n0\twm\n", "twice"),
        ("index\tname\tsource\n0\tbg\t0\n1\twm\tx\n", "integers"),
    ],
)
def test_bad_tsv(tmp_path, text, message):
    path = tmp_path / "bad.tsv"
    path.write_text(text)
    with pytest.raises(InputError, match=message):
        LabelMap.from_tsv(path)


def test_get_label_map(tmp_path):
    assert get_label_map("schneider-reduced") is SCHNEIDER_REDUCED_LABELS
    (tmp_path / "m.tsv").write_text(DEMO_PRETRAIN_LABELS.to_source_tsv())
    assert get_label_map(tmp_path / "m.tsv") == DEMO_PRETRAIN_LABELS
    with pytest.raises(InputError, match="unknown label map"):
        get_label_map("nope")


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
