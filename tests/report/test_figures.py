"""Report figures are real PNGs and report.md links them and lists every class."""

import re
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
from scipy import ndimage

from cerebrum_jax.evaluation import metrics
from cerebrum_jax.report import figures as report

NAMES = ["background", "csf", "grey matter", "white matter"]


def phantom(shape=(16, 20, 12), seed=0):
    """An image, a reference label volume and a slightly different prediction (values 0..3)."""
    field = ndimage.gaussian_filter(np.random.default_rng(seed).normal(size=shape), 2.0)
    ref = np.digitize(field, np.quantile(field, [0.3, 0.55, 0.8])).astype(np.uint8)
    pred = np.roll(ref, 1, axis=0)
    image = (ref * 50 + np.random.default_rng(seed + 1).normal(0, 5, shape)).astype(np.float32)
    return image, ref, pred


def history(phases=("warmup", "finetune"), epochs=4, dice=True):
    rows = []
    for p, phase in enumerate(phases):
        for e in range(epochs):
            row = {"phase": phase, "epoch": e, "train_loss": 1.0 / (e + 1 + p), "val_loss": 1.2 / (e + 1 + p)}
            row["lr"] = 1e-4 * 0.25 ** (e // 2)
            if dice:
                row["val_dice"] = 0.5 + 0.1 * e
            rows.append(row)
    return rows


def read_png(path):
    assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert img[..., :3].std() > 0.01  # not a blank canvas
    return img


@pytest.mark.slow
@pytest.mark.parametrize("dice", [True, False])
@pytest.mark.parametrize("phases", [("warmup", "finetune"), ("finetune",)])
def test_training_curves_png(tmp_path, dice, phases):
    out = report.plot_training_curves(history(phases, dice=dice), tmp_path / "curves.png")
    read_png(out)
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]  # no temporary left behind


@pytest.mark.slow
@pytest.mark.parametrize("spacing", [None, (0.7, 0.5, 1.2)])
def test_segmentation_and_probability_png(tmp_path, spacing):
    image, ref, pred = phantom()
    seg = report.plot_segmentation(image, ref, pred, NAMES, tmp_path / "seg.png", spacing=spacing)
    prob = np.clip(ndimage.gaussian_filter((ref == 2).astype(float), 1.0), 0, 1)
    pmap = report.plot_probability(image, prob, "grey matter", tmp_path / "prob.png", spacing=spacing)
    a, b = read_png(seg), read_png(pmap)
    assert a.shape != b.shape


@pytest.mark.parametrize(
    "call",
    [
        lambda p: report.plot_segmentation(
            np.zeros((4, 4, 4)), np.zeros((4, 4, 3)), np.zeros((4, 4, 4)), NAMES, p
        ),
        lambda p: report.plot_probability(np.zeros((4, 4, 4)), np.zeros((4, 4)), "x", p),
        lambda p: report.plot_training_curves([], p),
    ],
)
def test_bad_figure_input_writes_nothing(tmp_path, call):
    with pytest.raises(ValueError):
        call(tmp_path / "f.png")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_report_md_has_every_class_and_resolving_links(tmp_path):
    image, ref, pred = phantom()
    result = metrics.evaluate(pred, ref, (0.7, 0.7, 0.7), dict(enumerate(NAMES)))
    figs = tmp_path / "figures"
    figures = {
        "training curves": report.plot_training_curves(history(), figs / "curves.png"),
        "segmentation": report.plot_segmentation(image, ref, pred, NAMES, figs / "seg.png"),
    }
    meta = {
        "fold": 3,
        "test subject": "sub-003",
        "initial weights": "weights/demo",
        "timings": {"train_s": 12.5},
    }
    path = report.write_report(tmp_path / "run" / "report.md", result, figures, meta)
    text = path.read_text()
    for name, m in result["classes"].items():
        row = next(line for line in text.splitlines() if line.startswith(f"| {name} |"))
        assert f"{m['dice']:.4f}" in row
    assert f"{result['mean_dice']:.4f}" in text
    for fact in ("sub-003", "weights/demo", "timings.train_s", "12.5"):
        assert fact in text
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(links) == len(figures)
    for link in links:
        assert not Path(link).is_absolute()
        read_png(path.parent / link)


def test_cv_summary_mean_sd_and_missing_values():
    def fold(k, dice, hd):
        return {"fold": k, "mean_dice": dice, "classes": {"wm": {"dice": dice, "hd95_mm": hd, "vs": 1.0}}}

    summary = report.cv_summary([fold(1, 0.8, 2.0), fold(2, 0.9, None), fold(3, 0.7, 4.0)])
    assert summary["folds"] == [1, 2, 3]
    assert summary["mean_dice"]["mean"] == pytest.approx(0.8)
    assert summary["mean_dice"]["sd"] == pytest.approx(0.1)
    hd = summary["classes"]["wm"]["hd95_mm"]
    assert hd["n"] == 2 and hd["mean"] == pytest.approx(3.0)  # a fold without HD95 is left out
    table = report.cv_summary_markdown(summary)
    assert "| wm | 0.8000 ± 0.1000 | 3.0000 ± 1.4142 | 1.0000 ± 0.0000 |" in table


def test_classes_absent_from_both_are_na_everywhere(tmp_path):
    """A class absent from reference and prediction (e.g. the sagittal sinus of a label map that lacks it)
    is n/a in the metrics table, the fold's mean and the cross-validation summary: never a free 1.0."""
    image, ref, pred = phantom()
    names = {**dict(enumerate(NAMES)), 7: "sagittal sinus"}
    result = metrics.evaluate(pred, ref, (0.7, 0.7, 0.7), names)
    present = [m["dice"] for n, m in result["classes"].items() if n not in (NAMES[0], "sagittal sinus")]
    assert result["mean_dice"] == pytest.approx(np.mean(present)) and result["n_a"] == ["sagittal sinus"]
    text = report.write_report(tmp_path / "report.md", result, {}, {"fold": 1}).read_text()
    row = next(line for line in text.splitlines() if line.startswith("| sagittal sinus |"))
    assert row.count("n/a") == 3 and "1.0000" not in row
    assert "absent from both" in text
    other = dict(result, fold=2, mean_dice=0.5)
    summary = report.cv_summary([dict(result, fold=1), other])
    assert summary["classes"]["sagittal sinus"]["dice"] == {"mean": None, "sd": None, "n": 0}
    assert summary["mean_dice"]["mean"] == pytest.approx((result["mean_dice"] + 0.5) / 2)
    assert "| sagittal sinus | n/a | n/a | n/a |" in report.cv_summary_markdown(summary)


def test_report_gives_the_thin_classes_centre_lines(tmp_path):
    image, ref, pred = phantom()
    result = metrics.evaluate(pred, ref, (0.7, 0.7, 0.7), dict(enumerate(NAMES)))
    result["centreline"] = {"vessels|x": {"cl_recall": 0.75, "cl_precision": None, "cldice": None}}
    text = report.write_report(tmp_path / "report.md", result, {}, {"fold": 1}).read_text()
    assert "| vessels/x | 0.750 | n/a | n/a |" in text
    plain = report.write_report(
        tmp_path / "plain.md", {**result, "centreline": {}}, {}, {"fold": 1}
    ).read_text()
    assert "centre-line recall" not in plain
