"""The results page of a run, as the CEREBRUM-7T project page shows its results: surfaces, the Figure 7-S
panel and report.html for a fold; cv_summary.html for a cross-validation; and the BIDS derivative
descriptions of a fold's run directory.

Called by ``finetune.train_and_evaluate`` / ``run_cv`` after the predictions and report.md are written. A
fold's run directory gains surfaces/ (GIfTI, PNG, GIF, surfaces.json), figures/class_panel.png,
report.html, a "Surfaces" section in report.md, dataset_description.json and the predictions' JSON sidecars.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from cerebrum_jax.data import bids
from cerebrum_jax.errors import InputError
from cerebrum_jax.evaluation import surfaces
from cerebrum_jax.experiment.rundir import RunDir
from cerebrum_jax.fsafe import write_text
from cerebrum_jax.report import html_report, panels, surface_report


def surface_classes(requested, names, present=None) -> dict[int, str]:
    """{class index: name} of the config's surface_classes (None: the defaults; empty: none).

    InputError naming the config key for an unknown class.
    """
    if requested is not None and len(requested) == 0:
        return {}
    try:
        return surfaces.resolve_classes(requested, dict(enumerate(names)), present)
    except ValueError as e:
        raise InputError(str(e), "surface_classes") from None


def fold_surfaces(run_dir: Path, subject_id: str, grids: dict, dseg_path, names, requested) -> list[dict]:
    """Surfaces of the test subject's chosen classes in run_dir/surfaces, on the grid of the evaluation
    (``grids`` pred / ref class indices) with the affine of the written dseg file."""
    affine = nib.load(str(dseg_path)).affine
    present = set(np.unique(grids["pred"]).tolist()) | set(np.unique(grids["ref"]).tolist())
    classes = surface_classes(requested, names, present)
    return surface_report.write_class_surfaces(
        run_dir / "surfaces", subject_id, grids["ref"], grids["pred"], affine, classes
    )


def append_surfaces_md(report_md: Path, records: list[dict]) -> None:
    """Add a "Surfaces" section (distance table, one line per class without comparison, the views)."""
    lines = [
        report_md.read_text().rstrip("\n"),
        "",
        "## Surfaces",
        "",
        surface_report.surfaces_markdown(records),
    ]
    for r in records:
        if "png" in r["files"]:
            lines += [f"### {r['class']}", "", f"![{r['class']} surfaces](surfaces/{r['files']['png']})", ""]
    write_text(report_md, "\n".join(lines) + "\n")


def mirroring_words(tta: str, axes) -> str:
    """How the test subject was predicted: config key ``tta`` and the voxel ``axes`` it mirrored."""
    if not axes:
        return "none"
    return (
        f"the mean of the volume and its mirror images along voxel axes {tuple(axes)} (tta {tta}; "
        "segment with checkpoints/best does the same)"
    )


def run_meta(info: dict, result: dict) -> dict:
    """The run table of report.md, from config.json's content (``info``) and metrics.json's (``result``)."""
    from cerebrum_jax.experiment.normalization import describe_normalization

    return {
        "title": f"cerebrum-jax fine-tuning, fold {info['fold']}",
        "fold": info["fold"],
        "test subject": info["test_subject"],
        "training subjects": ", ".join(info["train_subjects"]),
        "input normalisation": describe_normalization(
            info["normalization"],
            info["normalization_note"],
            info["train_subjects"],
            tuple(info["grid"]),
            info["preprocessing"].get("mask", "file"),
        ),
        "initial weights": info["initial_weights"],
        "initial weights note": info["initial_weights_note"],
        "test-time mirroring": mirroring_words(info["config"].get("tta", "none"), result.get("tta_axes", [])),
        "git commit": info["git_commit"],
        "seed": info["seed"],
        "epochs": result["epochs"],
        "timings (s)": result["timings_s"],
    }


def fold_page(run_dir, subject, probs, grids, dseg_path, prepared, result, info, figures, cfg, log=print):
    """Everything a fold adds to its outputs after report.md: dataset_description.json (``fold_bids``),
    the surfaces, the class panel, the report's Surfaces section and report.html. Returns the seconds.

    subject: the loaded test subject (its id); probs (D, H, W, C) on the test image's own grid; grids:
    {"image", "ref", "pred", "spacing"} on that grid (``finetune.predict_test``); dseg_path: the written
    labels (their affine places the surfaces); prepared: ``fold.prepare_fold``'s ``PreparedFold``; result /
    info: metrics.json and config.json contents; figures: report.md's {caption: PNG path}.
    """
    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    names, k = prepared.fold.label_map.names, prepared.k_prob
    fold_bids(run_dir, info)
    records = fold_surfaces(run_dir, subject.id, grids, dseg_path, names, cfg.surface_classes)
    panel = panels.plot_class_panel(
        grids["image"],
        grids["ref"],
        probs[..., k],
        k,
        names[k],
        run_dir / "figures" / "class_panel.png",
        spacing=grids["spacing"],
    )
    figures = {**figures, f"Figure 7-S style: image, manual {names[k]}, probability of {names[k]}": panel}
    append_surfaces_md(run_dir / "report.md", records)
    meta = run_meta(info, result)
    html_report.write_fold_html(run_dir / "report.html", meta, result, figures, records, run_dir / "surfaces")
    seconds = time.perf_counter() - t0
    log(f"results page: {len(records)} class surface(s), BIDS sidecars and report.html in {seconds:.1f} s")
    return seconds


def cv_page(out, summary: dict, results: list[dict]) -> Path:
    """out/cv_summary.html with per-class boxplots (out/figures/cv_boxplots.png) across folds."""
    out = Path(out)
    records = {}
    for r in results:
        path = RunDir.fold(out, r["fold"]).root / "surfaces" / "surfaces.json"
        if path.is_file():
            records[r["fold"]] = json.loads(path.read_text())
    box = panels.plot_cv_boxplots(results, out / "figures" / "cv_boxplots.png", records or None)
    return html_report.write_cv_html(out / "cv_summary.html", summary, results, box, records or None)


def fold_bids(run_dir, info: dict) -> Path:
    """dataset_description.json of the run directory (SourceDatasets: the data root). info: config.json's
    content (git_commit, data). The sidecars come with the predictions (``export.write_segmentation``)."""
    root = bids.find_dataset_root(info["data"]) or Path(info["data"])
    return bids.write_dataset_description(Path(run_dir), info["git_commit"], [bids.source_dataset(root)])
