"""The few-label checks' cohorts and tables (experiments/check_cohorts.py, experiments/checks.py)."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cerebrum_jax.data import demo, skeleton  # noqa: E402
from cerebrum_jax.data.datasets import find_subjects  # noqa: E402
from experiments import check_cohorts, checks  # noqa: E402


def test_vessel_fraction_is_partial_volume_of_thin_trees():
    brain = np.zeros((30, 34, 30), bool)
    brain[3:27, 3:31, 3:27] = True
    f = check_cohorts.vessel_fraction(np.random.default_rng(0), brain, n_trees=6)
    again = check_cohorts.vessel_fraction(np.random.default_rng(0), brain, n_trees=6)
    np.testing.assert_array_equal(f, again)  # deterministic from the generator
    assert f.min() == 0 and f.max() == 1 and f.dtype == np.float32
    partial = (f > 0) & (f < 1)
    assert partial.sum() > (f == 1).sum()  # thin: most touched voxels are only partly filled
    assert not f[~brain].any()  # grown inside the brain
    vessels = f >= 0.5
    assert 100 < vessels.sum() < 0.05 * brain.sum()
    assert skeleton.skeleton_of(vessels).sum() > 0.05 * vessels.sum()  # tubes: a centre line (a blob: 1)
    filled = f * check_cohorts.SUPER**3  # whole numbers of the 4 x 4 x 4 sub-voxels
    np.testing.assert_allclose(filled, np.round(filled), atol=1e-3)


@pytest.mark.slow
def test_vessel_and_contrast_cohorts(tmp_path):
    """Written in the Schneider layout, with a vessel class of a few thousand voxels; the contrast
    cohort's test subject has grey matter brighter than white matter, the others the reverse."""
    root = check_cohorts.ensure_vessel_cohort(tmp_path / "vessels", n_subjects=2)
    subjects = find_subjects(root)
    assert [s.id for s in subjects] == ["sub-001", "sub-002"]
    import nibabel as nib

    labels = np.asarray(nib.load(subjects[0].labels).dataobj)
    image = np.asarray(nib.load(subjects[0].image).dataobj)
    assert 1000 < (labels == 4).sum() < 6000
    assert image[labels == 4].mean() > image[labels == 1].mean()  # bright blood
    assert (root / "dseg.tsv").read_text().splitlines()[-1].endswith("vessels")
    root = check_cohorts.ensure_contrast_cohort(tmp_path / "contrast", test_subject=2, n_subjects=2)
    (a, b) = find_subjects(root)
    for s, shifted in ((a, False), (b, True)):
        lab, img = (np.asarray(nib.load(p).dataobj) for p in (s.labels, s.image))
        assert (img[lab == 2].mean() > img[lab == 1].mean()) == shifted, s.id
    assert demo._is_intact(root, {**_params(root)})


def _params(root):
    import json

    return json.loads((root / "manifest.json").read_text())["params"]


def test_table_and_benchmarks_section(tmp_path):
    results = {
        "today": {
            "dice": {"wm": 0.8, "vessels": 0.1},
            "mean_dice": 0.45,
            "centreline": {"vessels": 0.2},
            "s": 100,
        },
        "recipe": {
            "dice": {"wm": 0.85, "vessels": None},
            "mean_dice": 0.5,
            "centreline": {"vessels": 0.6},
            "s": 90,
        },
    }
    text = checks.table("vessels", results)
    assert text.splitlines()[0] == "| variant | wm | vessels | mean | vessels centre line |"
    assert "| recipe | 0.850 | n/a | 0.500 | 0.600 |" in text
    page = tmp_path / "B.md"
    page.write_text("# Benchmarks\n")
    checks.write_section(page, "vessels", text)
    checks.write_section(page, "vessels", text.replace("0.850", "0.900"))  # replaced, not appended
    out = page.read_text()
    assert out.count(checks.MARK.format(check="vessels")) == 2 and "0.900" in out and "0.850" not in out


def test_every_variant_is_a_valid_config():
    for check, variants in checks.VARIANTS.items():
        base = checks.base_config(check, Path("/nonexistent"), 2)
        for name, overrides in variants.items():
            cfg = checks.variant_config(base, overrides)
            assert cfg.epochs_finetune == (2 if check != "demo" else base.epochs_finetune), (check, name)


def test_seed_changes_the_runs_not_the_cohort():
    for check in checks.VARIANTS:
        assert checks.base_config(check, Path("/nonexistent"), 2).seed == 0
        other = checks.base_config(check, Path("/nonexistent"), 2, seed=3)
        assert other.seed == 3 and other.data == checks.base_config(check, Path("/nonexistent"), 2).data


@pytest.mark.parametrize("name", ["fewlabel", "fewlabel_synth"])
def test_the_recipe_rows_are_the_recipes_as_they_are(name):
    """A "recipe" row takes experiments/<name>.py's loss, augmentation and prediction keys, so the table
    measures the recipe a user runs, not a copy of it."""
    cfg = checks.load_config(checks.HERE / f"{name}.py")
    row = checks.variant_config(checks.base_config("vessels", Path("/nonexistent"), 2), checks.recipe(name))
    for key in checks.RECIPE_KEYS:
        assert getattr(row, key) == getattr(cfg, key), key
    assert row.epochs_finetune == 2 and row.weights.endswith("demo")  # the check's schedule and start


@pytest.mark.parametrize(
    "overrides,twin",
    [({}, "v +tta"), ({"tta": "none"}, "v +tta"), ({"tta": "lr"}, "v without tta")],
)
def test_every_row_has_a_twin_predicted_the_other_way(overrides, twin):
    cfg = checks.variant_config(checks.base_config("vessels", Path("/nonexistent"), 2), overrides)
    assert checks.twin_name("v", cfg.tta) == twin
