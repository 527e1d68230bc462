"""The label map and its files (``labels``): named maps, edits, dseg.tsv written and read back byte for byte,
the tables without a row for 0, and the class names of ``convert --classes``."""

import numpy as np
import pytest

from cerebrum_jax.data import labels
from cerebrum_jax.data.labels import (
    DEMO_LABELS,
    DEMO_PRETRAIN_LABELS,
    SCHNEIDER_LABELS,
    SCHNEIDER_REDUCED_LABELS,
    LabelMap,
    edit_label_map,
    get_label_map,
    read_dseg,
)
from cerebrum_jax.errors import InputError

MAPS = [SCHNEIDER_LABELS, SCHNEIDER_REDUCED_LABELS, DEMO_LABELS, DEMO_PRETRAIN_LABELS]


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


def test_read_dseg_round_trip(tmp_path):
    names = {0: "background", 1: "grey matter", 4: "ventricles"}
    path = tmp_path / "dseg.tsv"
    path.write_text("index\tname\n" + "".join(f"{k}\t{v}\n" for k, v in names.items()))
    assert read_dseg(path) == names


def test_dseg_text_is_the_one_format(tmp_path):
    """Every writer of dseg.tsv gives these bytes: header, then index<TAB>name per class, LF endings."""
    names = ["background", "white matter", "grey matter"]
    expected = "index\tname\n0\tbackground\n1\twhite matter\n2\tgrey matter\n"
    assert labels.dseg_text(names) == expected
    assert LabelMap.identity(names).to_tsv() == expected
    labels.write_dseg(tmp_path / "dseg.tsv", names)
    assert (tmp_path / "dseg.tsv").read_bytes() == expected.encode()
    assert read_dseg(tmp_path / "dseg.tsv") == dict(enumerate(names))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("value\tlabel\n0\tbg\n", "header"),
        ("index\tname\nx\tbg\n", "line 2 is not"),
        ("index\tname\n0\tbg\n1\tbg\n", "duplicate"),
    ],
)
def test_read_dseg_errors(tmp_path, text, message):
    (tmp_path / "l.tsv").write_text(text)
    with pytest.raises(InputError, match=message):
        read_dseg(tmp_path / "l.tsv")


@pytest.mark.parametrize(
    ("spec", "n", "names"),
    [
        (None, 7, list(labels.GLASGOW_CLASSES)),
        (None, 3, ["class_0", "class_1", "class_2"]),
        ("bg, a ,b", 3, ["bg", "a", "b"]),
    ],
)
def test_read_class_names(spec, n, names):
    assert labels.read_class_names(spec, n) == names


def test_read_class_names_of_a_file(tmp_path):
    (tmp_path / "dseg.tsv").write_text(labels.dseg_text(["bg", "a"]))
    assert labels.read_class_names(str(tmp_path / "dseg.tsv"), 2) == ["bg", "a"]
    (tmp_path / "names.txt").write_text("bg\na\n\n")
    assert labels.read_class_names(str(tmp_path / "names.txt"), 2) == ["bg", "a"]
    with pytest.raises(InputError, match="3 class names given for a model with 2"):
        labels.read_class_names("a,b,c", 2)
