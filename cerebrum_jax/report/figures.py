"""Report figures (PNG, matplotlib Agg) and a Markdown report of a fine-tuning run.

Volumes are (D, H, W) arrays in stored voxel order; the three views are the slices through the
centre perpendicular to each voxel axis (axis 0, 1, 2), shown with the voxel spacing as aspect.
Every file is written under a temporary name and renamed, so a failed plot leaves nothing behind.
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: figures go to files only

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from cerebrum_jax.fsafe import atomic_path, write_text  # noqa: E402

AXIS_NAMES = ("axis 0", "axis 1", "axis 2")


def save_figure(fig, path, dpi: int = 100, tight: bool = True) -> Path:
    """Write ``fig`` as a PNG at ``path`` (atomically: a killed run leaves no half-written file) and
    close it; ``tight``: cropped to what is drawn."""
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight" if tight else None)
    finally:
        plt.close(fig)
    return path


def plot_training_curves(history: list[dict], path) -> Path:
    """Loss (train, val), learning rate and, when present, validation Dice per epoch, phase by phase.

    ``history``: one dict per epoch with keys phase (str), epoch (int, within the phase), train_loss,
    val_loss, lr and optionally val_dice (mean over classes). Epochs are laid out one after the other
    across phases, with a dashed line where a phase starts.
    """
    if not history:
        raise ValueError("history is empty")
    has_dice = any(h.get("val_dice") is not None for h in history)
    fig, axes = plt.subplots(1, 3 if has_dice else 2, figsize=(13 if has_dice else 9, 3.6))
    x = np.arange(1, len(history) + 1)
    phases = list(dict.fromkeys(h["phase"] for h in history))
    colors = plt.get_cmap("tab10")
    series = [("train_loss", "loss", "-"), ("val_loss", "loss", "--"), ("lr", "lr", "-")]
    if has_dice:
        series.append(("val_dice", "dice", "-"))
    panel = {"loss": axes[0], "lr": axes[1], "dice": axes[-1] if has_dice else None}
    for i, phase in enumerate(phases):
        idx = np.array([j for j, h in enumerate(history) if h["phase"] == phase])
        for key, where, style in series:
            ys = np.array([np.nan if history[j].get(key) is None else history[j][key] for j in idx], float)
            label = f"{phase} {key.replace('_', ' ')}"
            panel[where].plot(x[idx], ys, style, color=colors(i), marker=".", label=label)
        for ax in axes:
            ax.axvline(x[idx[0]] - 0.5, color="grey", linestyle=":", linewidth=0.8)
    axes[0].set(title="loss", xlabel="epoch (all phases)", ylabel="loss")
    axes[1].set(title="learning rate", xlabel="epoch (all phases)", ylabel="lr", yscale="log")
    if has_dice:
        axes[-1].set(title="validation Dice (mean)", xlabel="epoch (all phases)", ylabel="Dice", ylim=(0, 1))
    for ax in axes:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def _centre_slices(volume: np.ndarray, centre) -> list[np.ndarray]:
    """The three slices (2-D, transposed so axis order reads left-right, bottom-up) through ``centre``."""
    c = [s // 2 for s in volume.shape[:3]] if centre is None else [int(v) for v in centre]
    return [np.take(volume, c[a], axis=a).T for a in range(3)]


def _aspects(spacing) -> list[float]:
    """imshow aspect (row spacing / column spacing) of each of the three transposed slices."""
    s = (1.0, 1.0, 1.0) if spacing is None else tuple(float(v) for v in spacing)
    others = [[b for b in range(3) if b != a] for a in range(3)]
    return [s[o[1]] / s[o[0]] for o in others]


def label_cmap(n: int) -> ListedColormap:
    """Background transparent, classes 1..n-1 in distinct colours."""
    base = plt.get_cmap("tab10" if n <= 11 else "tab20")
    colours = [(0, 0, 0, 0)] + [base((i - 1) % base.N) for i in range(1, n)]
    return ListedColormap(colours)


def _grey(image: np.ndarray) -> dict:
    lo, hi = np.percentile(image, [1, 99]) if image.size else (0, 1)
    return {"cmap": "gray", "vmin": float(lo), "vmax": float(hi if hi > lo else lo + 1)}


def plot_segmentation(
    image, ref_labels, pred_labels, class_names, path, *, spacing=None, centre=None
) -> Path:
    """Three orthogonal slices through the centre: image | reference labels | predicted labels.

    image, ref_labels, pred_labels: (D, H, W) on the same grid; class_names[i] names label value i;
    spacing: voxel size in mm (3,) for the aspect ratio; centre: voxel (3,) the slices go through.
    """
    image = np.asarray(image, np.float32)
    if not (image.shape == np.shape(ref_labels) == np.shape(pred_labels)) or image.ndim != 3:
        raise ValueError(f"image {image.shape}, reference and prediction must share one 3-D shape")
    n = len(class_names)
    cmap = label_cmap(n)
    grey = _grey(image)
    fig, axes = plt.subplots(3, 3, figsize=(10, 10))
    columns = [("image", None), ("reference", ref_labels), ("prediction", pred_labels)]
    img_slices = _centre_slices(image, centre)
    for col, (title, labels) in enumerate(columns):
        lab_slices = None if labels is None else _centre_slices(np.asarray(labels), centre)
        for row, aspect in enumerate(_aspects(spacing)):
            ax = axes[row, col]
            ax.imshow(img_slices[row], origin="lower", aspect=aspect, **grey)
            if lab_slices is not None:
                lab = lab_slices[row]
                ax.imshow(lab, origin="lower", aspect=aspect, cmap=cmap, vmin=-0.5, vmax=n - 0.5, alpha=0.6)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(title)
            if col == 0:
                ax.set_ylabel(f"slice across {AXIS_NAMES[row]}")
    handles = [Patch(color=cmap(i), label=f"{i} {name}") for i, name in enumerate(class_names) if i > 0]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 4) or 1, fontsize=9)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return save_figure(fig, path)


def plot_probability(image, prob_map, class_name, path, *, spacing=None, centre=None) -> Path:
    """Probability (0-1) of one class over the image, three orthogonal slices through the centre.

    image and prob_map: (D, H, W) on the same grid; spacing (3,) mm sets the aspect ratio.
    """
    image, prob = np.asarray(image, np.float32), np.asarray(prob_map, np.float32)
    if image.shape != prob.shape or image.ndim != 3:
        raise ValueError(f"image {image.shape} and probability map {prob.shape} must share one 3-D shape")
    grey = _grey(image)
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4))
    for a, (ax, im, p, aspect) in enumerate(
        zip(axes, _centre_slices(image, centre), _centre_slices(prob, centre), _aspects(spacing), strict=True)
    ):
        ax.imshow(im, origin="lower", aspect=aspect, **grey)
        shown = ax.imshow(
            np.ma.masked_less(p, 0.01), origin="lower", aspect=aspect, cmap="hot", vmin=0, vmax=1
        )
        ax.set(xticks=[], yticks=[], title=f"slice across {AXIS_NAMES[a]}")
    fig.colorbar(shown, ax=axes, shrink=0.8, label=f"P({class_name})")
    fig.suptitle(f"probability of {class_name}")
    return save_figure(fig, path)


def fmt(value, digits=4) -> str:
    """A metric in a table: n/a for None (undefined, or a class absent from both volumes)."""
    return "n/a" if value is None else f"{value:.{digits}f}"


def metrics_table(metrics: dict) -> str:
    """Markdown table of ``metrics.evaluate``'s result: one row per class, then the mean Dice."""
    rows = ["| class | label | Dice | HD95 (mm) | VS |", "|---|---:|---:|---:|---:|"]
    for name, m in metrics["classes"].items():
        label = m.get("label", "")
        hd = fmt(m["hd95_mm"], 2) if m["hd95_mm"] is not None or m.get("absent") else "inf"
        rows.append(f"| {name} | {label} | {fmt(m['dice'])} | {hd} | {fmt(m['vs'])} |")
    rows.append(f"| **mean (no background)** | | **{fmt(metrics.get('mean_dice'))}** | | |")
    if metrics.get("n_a"):
        rows += [
            "",
            f"n/a: {', '.join(metrics['n_a'])} absent from both reference and prediction (not scored).",
        ]
    return "\n".join(rows)


def write_report(path, metrics: dict, figures: dict[str, str | os.PathLike], meta: dict) -> Path:
    """Write ``report.md`` at ``path``: the run's facts, the metrics table and the figures.

    metrics: ``metrics.evaluate``'s result; figures: {caption: PNG path}, linked relative to the
    report's folder; meta: the run's facts (fold, test subject, initial weights, timings, ...), shown
    in order as a two-column table (nested dicts flattened as ``key.sub``).
    """
    path = Path(path)
    lines = [f"# {meta.get('title', 'cerebrum-jax run report')}", "", "## Run", "", "| | |", "|---|---|"]
    for key, value in flatten({k: v for k, v in meta.items() if k != "title"}):
        value = value.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {key} | {value} |")
    lines += ["", "## Test-subject metrics", "", metrics_table(metrics), ""]
    if metrics.get("centreline"):  # thin classes: how much of the reference's centre line was found
        lines += ["| thin class | centre-line recall | centre-line precision | clDice |", "|---|---|---|---|"]
        for name, c in metrics["centreline"].items():
            cells = (fmt(c[k], 3) for k in ("cl_recall", "cl_precision", "cldice"))
            lines.append(f"| {name.replace('|', '/')} | {' | '.join(cells)} |")
        lines.append("")
    if figures:
        lines += ["## Figures", ""]
        for caption, fig_path in figures.items():
            rel = Path(os.path.relpath(Path(fig_path).absolute(), path.absolute().parent)).as_posix()
            lines += [f"### {caption}", "", f"![{caption}]({rel})", ""]
    return write_text(path, "\n".join(lines))


def flatten(d: dict, prefix: str = ""):
    """(key, text) of every leaf of the nested dict ``d``: keys joined as ``key.sub``, floats as .4g, the
    rest as str (the run table of report.md and report.html)."""
    for key, value in d.items():
        if isinstance(value, dict):
            yield from flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", (f"{value:.4g}" if isinstance(value, float) else str(value))


def cv_summary(results: list[dict]) -> dict:
    """Mean and sd across folds of Dice, HD95 (mm) and VS per class, and of the mean Dice.

    A fold where a class is n/a (absent from both volumes) or its HD95 infinite (None) is left out of
    that class's figures; "n" says how many folds each figure averages."""
    classes = {}
    for name in results[0]["classes"]:
        row = {}
        for key in ("dice", "hd95_mm", "vs"):
            vals = [r["classes"][name][key] for r in results if r["classes"][name][key] is not None]
            row[key] = {
                "mean": float(np.mean(vals)) if vals else None,
                "sd": float(np.std(vals, ddof=1)) if len(vals) > 1 else None,
                "n": len(vals),
            }
        classes[name] = row
    md = [r["mean_dice"] for r in results if r["mean_dice"] is not None]
    return {
        "folds": [r["fold"] for r in results],
        "classes": classes,
        "mean_dice": {
            "mean": float(np.mean(md)) if md else None,
            "sd": float(np.std(md, ddof=1)) if len(md) > 1 else None,
            "n": len(md),
        },
    }


def cv_summary_markdown(summary: dict) -> str:
    """The table of ``cv_summary``: mean ± sd across folds per class."""
    fmt = lambda s: "n/a" if s["mean"] is None else f"{s['mean']:.4f} ± {s['sd'] or 0:.4f}"  # noqa: E731
    rows = [
        f"# Cross-validation summary (folds {summary['folds']})",
        "",
        "| class | Dice | HD95 (mm) | VS |",
        "|---|---:|---:|---:|",
    ]
    rows += [
        f"| {n} | {fmt(r['dice'])} | {fmt(r['hd95_mm'])} | {fmt(r['vs'])} |"
        for n, r in summary["classes"].items()
    ]
    rows.append(f"| **mean Dice (no background)** | **{fmt(summary['mean_dice'])}** | | |")
    return "\n".join(rows) + "\n"


def fold_figures(run_dir: Path, history, grids: dict, probs, names, k_prob) -> dict:
    """Training curves, image / reference / prediction slices and one class's probability map, on the
    test subject's own grid (``predict_test``'s ``grids``); {caption: PNG path}."""
    figs = run_dir / "figures"
    out = {}
    if history:
        out["Training curves"] = plot_training_curves(history, figs / "training_curves.png")
    image, spacing = grids["image"], grids["spacing"]
    out["Test subject: image, reference, prediction"] = plot_segmentation(
        image, grids["ref"], probs.argmax(-1), list(names), figs / "segmentation.png", spacing=spacing
    )
    out[f"Probability of {names[k_prob]}"] = plot_probability(
        image, probs[..., k_prob], names[k_prob], figs / "probability.png", spacing=spacing
    )
    return out
