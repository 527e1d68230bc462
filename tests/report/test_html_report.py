"""report.html and cv_summary.html: one self-contained file each, every image embedded and decodable."""

import base64
import io

import numpy as np
import pytest
from html_kit import Page, viewer_of
from PIL import Image

from cerebrum_jax.report import figures as report
from cerebrum_jax.report import html_report, panels, surface_report


def check_self_contained(text: str) -> Page:
    """Parse the HTML; every <img> is a data: URI that decodes to a valid image; no links out; no script
    but the 3-D viewer's, embedded whole (``parsed.viewer``: its data, or None)."""
    parsed = Page(text)
    parsed.viewer = viewer_of(parsed)
    assert parsed.imgs, "no images"
    for src in parsed.imgs:
        assert src.startswith("data:image/") and ";base64," in src, src[:60]
        raw = base64.b64decode(src.split(",", 1)[1], validate=True)
        Image.open(io.BytesIO(raw)).verify()  # raises on a truncated or foreign file
    assert "link" not in [tag for tag, _ in parsed.tags] and not parsed.links
    return parsed


def _volumes(shape=(20, 24, 16)):
    g = np.indices(shape).astype(float)
    r = np.sqrt(((g - (np.array(shape)[:, None, None, None] - 1) / 2) ** 2).sum(0))
    ref = np.select([r < 4, r < 7], [1, 2], 0).astype(np.uint8)
    pred = np.roll(ref, 1, axis=1)
    image = (ref * 100 + np.random.default_rng(0).normal(0, 5, shape)).astype(np.float32)
    return image, ref, pred


@pytest.mark.slow
def test_fold_report_is_self_contained(tmp_path):
    image, ref, pred = _volumes()
    names = ["background", "white matter", "grey matter", "vessels"]
    prob = (ref == 2).astype(np.float32) * 0.8
    figs = {
        "Training curves": report.plot_training_curves(
            [{"phase": "warmup", "epoch": 1, "train_loss": 1.0, "val_loss": 1.1, "lr": 1e-3}],
            tmp_path / "c.png",
        ),
        "slices": report.plot_segmentation(image, ref, pred, names, tmp_path / "s.png"),
        "Figure 7-S": panels.plot_class_panel(image, ref, prob, 2, "grey matter", tmp_path / "p.png"),
    }
    recs = surface_report.write_class_surfaces(
        tmp_path / "surf", "sub-1", ref, pred, np.eye(4), {1: "white matter", 2: "grey matter", 3: "vessels"},
        frames=2,
    )  # fmt: skip
    metrics = {
        "classes": {
            "background": {"label": 0, "dice": 0.99, "hd95_mm": 1.0, "vs": 0.99},
            "white matter": {"label": 1, "dice": 0.8, "hd95_mm": 1.0, "vs": 0.9},
            "vessels": {"label": 3, "dice": None, "hd95_mm": None, "vs": None},  # absent from both: n/a
        },
        "mean_dice": 0.8,
    }
    meta = {"title": "fold <3> & co", "fold": 3, "timings (s)": {"total": 12.5}}
    path = html_report.write_fold_html(tmp_path / "report.html", meta, metrics, figs, recs, tmp_path / "surf")
    text = path.read_text()
    parsed = check_self_contained(text)
    assert len(parsed.imgs) == 3 + 2 * 2  # three figures, a PNG and a GIF per class with both surfaces
    assert len(parsed.viewer["classes"]) == 2 and '<option value="1">grey matter</option>' in text
    assert "<title>fold &lt;3&gt; &amp; co</title>" in text  # escaped
    assert parsed.cells.count("n/a") == 3 and "timings (s).total" in parsed.cells
    assert "vessels: absent from both the reference and the prediction: no surface" in text


@pytest.mark.slow
def test_cv_report_with_boxplots(tmp_path):
    def fold(k, wm, vessels):
        return {
            "fold": k,
            "test_subject": f"sub-{k}",
            "mean_dice": wm,
            "classes": {
                "background": {"dice": 0.99, "hd95_mm": 0.0, "vs": 1.0},
                "white matter": {"dice": wm, "hd95_mm": 2.0 + k, "vs": 0.9},
                "vessels": {"dice": vessels, "hd95_mm": None, "vs": vessels},
            },
        }

    results = [fold(1, 0.9, 0.4), fold(2, 0.85, None), fold(3, 0.88, 0.5)]
    summary = report.cv_summary(results)
    recs = {1: [{"class": "white matter", "distance_mm": {"mean": 0.1, "mean_abs": 0.5, "p95_abs": 1.2}}]}
    box = panels.plot_cv_boxplots(results, tmp_path / "box.png", recs)
    assert Image.open(box).size[0] > 600  # three panels side by side
    text = html_report.write_cv_html(tmp_path / "cv.html", summary, results, box, recs).read_text()
    parsed = check_self_contained(text)
    assert len(parsed.imgs) == 1 and parsed.viewer is None  # no surfaces, no scripts
    assert "0.8767 ± 0.0252" in text and "n/a" in parsed.cells  # mean ± sd of the WM Dice; fold 2 vessels


def test_data_uri_refuses_what_it_cannot_embed(tmp_path):
    (tmp_path / "x.svg").write_text("<svg/>")
    with pytest.raises(ValueError, match="not an image type"):
        html_report.data_uri(tmp_path / "x.svg")
