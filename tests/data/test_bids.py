"""BIDS derivatives: names, dataset_description.json and sidecars of segment, offline validation, and label
tables without a row for 0 (fMRIPrep's dseg.tsv)."""

import json

import jax
import nibabel as nib
import numpy as np
import pytest

from cerebrum_jax.cli import main
from cerebrum_jax.data import bids
from cerebrum_jax.data import labels as L
from cerebrum_jax.model import checkpoint
from cerebrum_jax.model.network import ModelConfig, init_params


@pytest.mark.parametrize(
    "source, space, prefix",
    [
        ("sub-01_ses-2_T1w.nii.gz", "orig", "sub-01_ses-2_space-orig"),
        ("/d/sub-01/anat/sub-01_acq-mp2rage_run-1_UNIT1.nii", "orig", "sub-01_acq-mp2rage_run-1_space-orig"),
        ("sub-019", "orig", "sub-019_space-orig"),
        ("sub-019", None, "sub-019"),
        ("sub-01_desc-cerebrum_space-x_dseg.nii.gz", "orig", "sub-01_space-orig"),  # desc/space replaced
        ("brain.nii.gz", "orig", "brain_space-orig"),
        ("sub-002_uni_unbiased.nii.gz", "orig", "sub-002_space-orig"),  # Schneider's names: the subject
    ],
)
def test_derivative_prefix(source, space, prefix):
    assert bids.derivative_prefix(source, space) == prefix
    assert bids.SEG_NAME.match(f"{prefix}_desc-cerebrum_dseg.nii.gz") or not prefix.startswith("sub-")


def _dataset(root):
    """A raw BIDS dataset with a DOI and one T1w image (a blob), and a tiny checkpoint of 3 classes."""
    (root / "sub-07" / "anat").mkdir(parents=True)
    (root / "dataset_description.json").write_text(
        json.dumps({"Name": "raw", "BIDSVersion": "1.10.0", "DatasetDOI": "10.1234/raw.v1"})
    )
    g = np.indices((16, 16, 8)).astype(float)
    image = 100 * np.exp(-(((g - 8) / 4) ** 2).sum(0)).astype(np.float32)
    src = root / "sub-07" / "anat" / "sub-07_T1w.nii.gz"
    nib.save(nib.Nifti1Image(image, np.diag([0.7, 0.7, 0.7, 1])), src)
    cfg = ModelConfig(n_filters=2, n_classes=3)
    ckpt = root.parent / "ckpt"
    params = init_params(cfg, jax.random.key(0))
    checkpoint.save_checkpoint(
        ckpt, params, cfg, classes=["background", "wm", "gm"], meta={"description": "t"}
    )
    return src, ckpt


@pytest.mark.slow
def test_segment_output_is_a_valid_derivative_dataset(tmp_path):
    src, ckpt = _dataset(tmp_path / "raw")
    out = tmp_path / "seg"
    assert main(["segment", str(src), "--weights", str(ckpt), "--out", str(out)]) == 0
    assert bids.validate_dataset(out) == []
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["GeneratedBy"][0]["Name"] == "cerebrum-jax"
    assert desc["SourceDatasets"] == [
        {"URL": (tmp_path / "raw").absolute().as_uri(), "DOI": "10.1234/raw.v1"}
    ]
    side = json.loads((out / "sub-07_space-orig_desc-cerebrum_probseg.json").read_text())
    assert side["Sources"] == [src.absolute().as_uri()] and side["Classes"] == ["background", "wm", "gm"]
    assert side["Checkpoint"] == str(ckpt.absolute()) and side["BrainMaskApplied"] is False
    assert side["Normalization"] == "zscore" and side["Manual"] is False
    dseg = nib.load(out / "sub-07_space-orig_desc-cerebrum_dseg.nii.gz")
    assert np.allclose(dseg.affine, nib.load(src).affine)  # space-orig: the input's grid


def test_validator_finds_what_breaks_the_rules(tmp_path):
    bids.write_dataset_description(tmp_path, "abc123", [{"URL": "file:///data"}])
    good = tmp_path / "sub-01_space-orig_desc-cerebrum_dseg.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.uint8), np.eye(4)), good)
    fields = bids.seg_sidecar(
        kind="dseg", sources=["file:///x.nii"], checkpoint="/w", classes=["bg", "a"], normalization="zscore",
        brain_mask=True,
    )  # fmt: skip
    bids.write_sidecar(good, fields)
    (tmp_path / "dseg.tsv").write_text("index\tname\n0\tbg\n1\ta\n")
    assert bids.validate_dataset(tmp_path) == []
    assert (
        "git commit abc123"
        in json.loads((tmp_path / "dataset_description.json").read_text())["GeneratedBy"][0]["Description"]
    )
    bad_order = tmp_path / "sub-01_desc-cerebrum_space-orig_probseg.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2, 2), np.float32), np.eye(4)), bad_order)  # no sidecar either
    bids.write_sidecar(good, {**fields, "BrainMaskApplied": "yes", "Sources": [""]})
    (tmp_path / "dataset_description.json").write_text(json.dumps({"Name": "x", "DatasetType": "raw"}))
    problems = "\n".join(bids.validate_dataset(tmp_path))
    for expected in (
        "BIDSVersion must be a str",
        "DatasetType must be 'derivative'",
        "GeneratedBy[0] needs a Name",
        "are not in the specification's order",
        "sub-01_desc-cerebrum_space-orig_probseg.json: missing",
        "BrainMaskApplied must be a bool",
        "Sources must be non-empty strings",
    ):
        assert expected in problems, expected


def test_label_tables_without_a_row_for_zero(tmp_path):
    tsv = tmp_path / "dseg.tsv"
    tsv.write_text("index\tname\n1\twhite matter\n2\tgrey matter\n")  # as fMRIPrep writes them
    lm = L.get_label_map(tsv)
    assert lm.names == ("background", "white matter", "grey matter") and lm.apply(np.array([0, 2]))[1] == 2
    assert L.with_background({1: "a"}) == {0: "background", 1: "a"}
    assert L.with_background({1: "background"}) == {0: "0", 1: "background"}
    labels = np.zeros((6, 6, 6), np.uint8)
    labels[1:4, 1:4, 1:4] = 1
    labels[3:5, 3:5, 3:5] = 2
    for name in ("a.nii.gz", "b.nii.gz"):
        nib.save(nib.Nifti1Image(labels, np.eye(4)), tmp_path / name)
    out = tmp_path / "m.json"
    args = ["evaluate", str(tmp_path / "a.nii.gz"), str(tmp_path / "b.nii.gz"), "--labels", str(tsv)]
    assert main([*args, "--json", str(out)]) == 0  # was: "label values [0] are not in dseg.tsv"
    result = json.loads(out.read_text())
    assert list(result["classes"]) == ["background", "white matter", "grey matter"]
    assert result["classes"]["white matter"]["dice"] == 1.0
