"""The BIDS App (``cerebrum-jax bids``): a small BIDS tree made here (subjects with and without sessions,
T1w and MP2RAGE UNIT1, NIfTI and MGZ, one broken file), the participant level's outputs, skips, filters and
failures, and the group level's table and page."""

from __future__ import annotations

import html.parser
import json

import jax
import nibabel as nib
import numpy as np
import pytest

from cerebrum_jax.cli import main
from cerebrum_jax.experiment import bids_app
from cerebrum_jax.model import network as model
from cerebrum_jax.model.checkpoint import save_checkpoint

CLASSES = ["background", "<script>alert(1)</script>", '"><img src=x onerror=alert(2)>']
AFFINE = np.diag([2.0, 2.5, 3.0, 1.0])
IMAGES = {  # path in the dataset -> nibabel class (None: a broken file)
    "sub-01/anat/sub-01_T1w.nii.gz": nib.Nifti1Image,
    "sub-02/ses-1/anat/sub-02_ses-1_acq-mp2rage_UNIT1.nii.gz": nib.Nifti1Image,
    "sub-02/ses-2/anat/sub-02_ses-2_T1w.mgz": nib.MGHImage,
    "sub-03/anat/sub-03_T1w.nii.gz": None,
}
SUB01 = "sub-01/anat/sub-01_space-orig_desc-cerebrum_dseg.nii.gz"
SES1 = "sub-02/ses-1/anat/sub-02_ses-1_acq-mp2rage_space-orig_desc-cerebrum_dseg.nii.gz"
SES2 = "sub-02/ses-2/anat/sub-02_ses-2_space-orig_desc-cerebrum_dseg.nii.gz"
OUTPUTS = {SUB01, SES1, SES2}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    config = model.ModelConfig(n_filters=2, n_classes=3)
    path = tmp_path_factory.mktemp("ck") / "model"
    return save_checkpoint(path, model.init_params(config, jax.random.key(1)), config, classes=CLASSES)


@pytest.fixture
def dataset(tmp_path):
    root = tmp_path / "ds"
    root.mkdir()
    (root / "dataset_description.json").write_text(json.dumps({"Name": "t", "BIDSVersion": "1.9.0"}))
    rng = np.random.default_rng(0)
    for rel, cls in IMAGES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        if cls is None:
            (root / rel).write_bytes(b"not an image")
        else:
            nib.save(cls(rng.normal(100, 20, (12, 16, 10)).astype(np.float32), AFFINE), str(root / rel))
    (root / "sub-01" / "anat" / "sub-01_T1w.json").write_text("{}")
    return root


def bids(dataset, ckpt, *extra):
    return main(["bids", str(dataset), str(dataset / "derivatives" / "cj"), *extra, "--weights", str(ckpt)])


def written(dataset) -> set[str]:
    out = dataset / "derivatives" / "cj"
    return {str(p.relative_to(out)) for p in out.rglob("*_dseg.nii.gz")}


def test_participant_level_segments_every_image_and_goes_on_past_a_broken_one(dataset, ckpt, capsys):
    assert bids(dataset, ckpt, "participant", "--no-probseg") == 1  # one failed
    out = dataset / "derivatives" / "cj"
    assert written(dataset) == OUTPUTS
    for rel in OUTPUTS:
        img = nib.load(out / rel)
        assert img.shape == (12, 16, 10) and np.allclose(img.affine, AFFINE)
    failures = (out / "failures.tsv").read_text().splitlines()
    assert failures[0] == "participant_id\tsession_id\tfile\terror" and len(failures) == 2
    assert failures[1].startswith("sub-03\tn/a\tsub-03_T1w.nii.gz\t") and "not a readable" in failures[1]
    assert json.loads((out / "dataset_description.json").read_text())["DatasetType"] == "derivative"
    assert (out / "dseg.tsv").is_file() and not list(out.glob(".*"))  # no lock or temporary file left
    assert "3 segmented, 1 failed of 4 images" in capsys.readouterr().out


def test_done_images_are_skipped_and_failures_kept_until_tried_again(dataset, ckpt, capsys):
    bids(dataset, ckpt, "participant", "--no-probseg")
    out = dataset / "derivatives" / "cj"
    before = {rel: (out / rel).stat().st_mtime_ns for rel in OUTPUTS}
    capsys.readouterr()
    assert bids(dataset, ckpt, "participant", "--participant-label", "01", "sub-02") == 0
    assert "0 segmented, 0 failed of 3 images" in capsys.readouterr().out
    assert {rel: (out / rel).stat().st_mtime_ns for rel in OUTPUTS} == before
    assert "sub-03" in (out / "failures.tsv").read_text()  # not tried this time: still failed
    assert bids(dataset, ckpt, "participant", "--participant-label", "01", "--overwrite", "--no-probseg") == 0
    assert (out / SUB01).stat().st_mtime_ns > before[SUB01]
    (dataset / "sub-03" / "anat" / "sub-03_T1w.nii.gz").unlink()  # fixed by the user: no image now
    (dataset / "sub-03" / "anat" / "sub-03_T1w.nii.gz").with_name("sub-03_T1w.nii").write_bytes(
        nib.Nifti1Image(np.ones((12, 16, 10), np.float32), AFFINE).to_bytes()
    )
    assert bids(dataset, ckpt, "participant", "--participant-label", "03", "--no-probseg") == 0
    assert not (out / "failures.tsv").exists()


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--session-label", "1"], {SES1}),
        (["--participant-label", "02", "--session-label", "ses-2"], {SES2}),
        (["--bids-filter-file", "{filters}"], {SES1}),
    ],
    ids=["session", "participant+session", "filter file"],
)  # fmt: skip
def test_labels_and_filters_choose_the_images(dataset, ckpt, tmp_path, extra, expected):
    filters = tmp_path / "filters.json"
    filters.write_text(json.dumps({"t1w": {"datatype": "anat", "suffix": "UNIT1", "acquisition": "mp2rage"}}))
    extra = [e.replace("{filters}", str(filters)) for e in extra]
    assert bids(dataset, ckpt, "participant", "--no-probseg", *extra) == 0
    assert written(dataset) == expected


BAD = {
    "label with a path": (["participant", "--participant-label", "../x"], "letters and digits only"),
    "unknown subject": (["participant", "--participant-label", "09"], "no subject folder for"),
    "unknown filter entity": (["participant", "--bids-filter-file", "{bad_filter}"], "unknown entity"),
    "no session matches": (["participant", "--session-label", "7"], "no T1w or UNIT1 image found"),
    "group before participant": (["group"], "no dseg.tsv: run the participant level into it first"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD)
def test_bad_options_are_one_line(dataset, ckpt, tmp_path, capsys, case):
    argv, message = BAD[case]
    bad_filter = tmp_path / "bad.json"
    bad_filter.write_text(json.dumps({"t1w": {"colour": "blue"}}))
    argv = [a.replace("{bad_filter}", str(bad_filter)) for a in argv]
    assert bids(dataset, ckpt, *argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (dataset / "derivatives" / "cj" / "sub-01").exists()


def test_output_dir_that_is_the_dataset_or_a_dataset_without_description(dataset, ckpt, capsys):
    assert main(["bids", str(dataset), str(dataset), "participant", "--weights", str(ckpt)]) == 2
    assert "OUTPUT_DIR is BIDS_DIR" in capsys.readouterr().err
    (dataset / "dataset_description.json").unlink()
    assert bids(dataset, ckpt, "participant") == 2
    assert "no dataset_description.json" in capsys.readouterr().err


class _Page(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.images, self.text = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.images.append(dict(attrs))

    def handle_data(self, data):
        self.text.append(data)


def test_group_level_table_and_page(dataset, ckpt):
    bids(dataset, ckpt, "participant", "--no-probseg")
    out = dataset / "derivatives" / "cj"
    assert bids(dataset, ckpt, "group") == 0
    lines = (out / "group_volumes.tsv").read_text().splitlines()
    assert lines[0].split("\t") == ["participant_id", "session_id", "file", *(f"{c}_mm3" for c in CLASSES)]
    rows = {r.split("\t")[2]: r.split("\t") for r in lines[1:]}
    assert set(rows) == OUTPUTS
    for rel, row in rows.items():
        seg = np.asarray(nib.load(out / rel).dataobj)
        expected = [np.count_nonzero(seg == k) * 15.0 for k in range(3)]  # 2 x 2.5 x 3 mm voxels
        assert np.allclose([float(v) for v in row[3:]], expected) and sum(expected) == 12 * 16 * 10 * 15.0
    assert {tuple(r[:2]) for r in rows.values()} == {
        ("sub-01", "n/a"),
        ("sub-02", "ses-1"),
        ("sub-02", "ses-2"),
    }
    page = _Page()
    page.feed((out / "group.html").read_text())
    assert "script" not in page.tags and all("onerror" not in i for i in page.images)  # names escaped
    assert CLASSES[1] + " (mm³)" in page.text  # shown as text
    assert len(page.images) == 3 and all(i["src"].startswith("data:image/png;base64,") for i in page.images)


def test_find_images_counts_a_pair_once(tmp_path):
    anat = tmp_path / "sub-01" / "anat"
    anat.mkdir(parents=True)
    nib.save(nib.Nifti1Pair(np.zeros((4, 4, 4), np.float32), np.eye(4)), str(anat / "sub-01_T1w.img"))
    (found,) = bids_app.find_images(tmp_path)
    assert found.path.name == "sub-01_T1w.img" and found.subject == "01" and found.session == ""
