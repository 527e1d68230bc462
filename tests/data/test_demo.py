"""The offline demo cohort: built from nilearn's template with no network, deterministic, reused when intact.

Reduced variants (2 subjects at 6 mm) keep the builds fast; the recipe is the same as the default's.
"""

import json
import os
import stat

import numpy as np
import pytest

from cerebrum_jax.data import demo
from cerebrum_jax.data.datasets import find_subjects
from cerebrum_jax.data.inputs import Preprocessing, load_subject
from cerebrum_jax.data.labels import DEMO_LABELS, DEMO_PRETRAIN_LABELS
from cerebrum_jax.data.nifti import load_nifti
from cerebrum_jax.errors import InputError

SMALL = {"n_subjects": 2, "voxel_mm": 6.0}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return demo.ensure_demo_cohort(tmp_path_factory.mktemp("demo") / "demo", **SMALL)


@pytest.mark.slow
def test_build_is_deterministic(cohort, tmp_path):
    again = demo.build_demo_cohort(tmp_path / "again", **SMALL)
    first = json.loads((cohort / "manifest.json").read_text())
    second = json.loads((again / "manifest.json").read_text())
    assert first == second
    assert len(first["files"]) == 2 * SMALL["n_subjects"] + 2


@pytest.mark.slow
def test_reader_reads_the_cohort(cohort):
    subjects = find_subjects(cohort)
    assert [s.id for s in subjects] == ["sub-001", "sub-002"]
    images = []
    for s in subjects:
        image, img = load_nifti(s.image)
        labels, limg = load_nifti(s.labels, what="labels")
        np.testing.assert_allclose(img.affine, limg.affine)
        np.testing.assert_allclose(np.abs(np.diag(img.affine)[:3]), SMALL["voxel_mm"])
        assert image.shape == labels.shape and image.min() >= 0
        assert set(np.unique(labels).astype(int)) == {0, 1, 2, 3}
        # WM is brighter than GM, GM than CSF in a T1-weighted image, whatever the gamma and gain
        means = [image[labels == k].mean() for k in (1, 2, 3)]
        assert means[0] > means[1] > means[2]
        images.append(image)
    assert not np.allclose(images[0], images[1])  # distinct pseudo-subjects


@pytest.mark.parametrize("label_map", [DEMO_LABELS, DEMO_PRETRAIN_LABELS])
def test_label_sets_load(cohort, label_map):
    loaded = load_subject(find_subjects(cohort)[0], label_map, Preprocessing(mask="labels", crop="box"))
    assert sorted(np.unique(loaded.labels)) == list(range(label_map.n_classes))


def test_reused_when_intact_rebuilt_when_corrupt(cohort):
    image = cohort / "derivatives/sub-001/unbiased/sub-001_uni_unbiased.nii.gz"
    stamp = image.stat().st_mtime_ns
    assert demo.ensure_demo_cohort(cohort, **SMALL) == cohort
    assert image.stat().st_mtime_ns == stamp  # not rewritten
    good = image.read_bytes()
    image.write_bytes(good[:-10])  # truncated: checksum mismatch
    demo.ensure_demo_cohort(cohort, **SMALL)
    assert image.read_bytes() == good


def test_pretrain_cohort_differs(cohort, tmp_path):
    other = demo.ensure_pretrain_cohort(tmp_path / "pre", **SMALL)
    a, _ = load_nifti(find_subjects(cohort)[0].labels)
    b, _ = load_nifti(find_subjects(other)[0].labels)
    assert a.shape == b.shape and not np.array_equal(a, b)


def test_refuses_to_overwrite_other_data(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "scan.nii.gz").write_bytes(b"x")
    with pytest.raises(InputError, match="not a demo cohort"):
        demo.ensure_demo_cohort(tmp_path / "real", **SMALL)
    assert (tmp_path / "real" / "scan.nii.gz").read_bytes() == b"x"


def test_tissue_posteriors_follow_intensity_within_priors():
    """MAP tissue classes: with weak priors that point to the wrong class in 30 % of the voxels (0.5 on
    it, 0.25 on the others), the T1 intensity decides (bright WM, dark CSF); posteriors sum to 1 inside
    the brain mask and are 0 outside."""
    rng = np.random.default_rng(0)
    shape = (12, 12, 12)
    truth = rng.integers(0, 3, shape)  # 0 WM, 1 GM, 2 CSF
    t1 = np.array([0.8, 0.6, 0.3], np.float32)[truth] + rng.normal(0, 0.03, shape).astype(np.float32)
    brain = np.ones(shape, np.float32)
    brain[0] = 0.0
    hint = np.where(rng.random(shape) < 0.7, truth, (truth + rng.integers(1, 3, shape)) % 3)
    weak = [np.where(hint == k, 0.5, 0.25).astype(np.float32) for k in range(3)]
    post = demo.tissue_posteriors(t1, weak[1], weak[0], brain)
    stacked = np.stack([post["wm"], post["gm"], post["csf"]])
    np.testing.assert_allclose(stacked[:, 1:].sum(0), 1.0, atol=1e-5)
    assert np.all(stacked[:, 0] == 0)
    accuracy = np.mean(np.argmax(stacked[:, 1:], 0) == truth[1:])
    assert accuracy > 0.9 and accuracy > np.mean(hint == truth) + 0.15
    # a strong prior wins over an ambiguous intensity (half-way between GM and WM)
    t1[5, 5, 5] = 0.7
    gm, wm = weak[1].copy(), weak[0].copy()
    gm[5, 5, 5], wm[5, 5, 5] = 0.9, 0.05
    post = demo.tissue_posteriors(t1, gm, wm, brain)
    assert post["gm"][5, 5, 5] > post["wm"][5, 5, 5]


def test_cohort_directory_gets_default_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        root = demo.build_demo_cohort(tmp_path / "c", **SMALL)
    finally:
        os.umask(old)
    assert stat.S_IMODE(root.stat().st_mode) == 0o755  # not mkdtemp's 0700
