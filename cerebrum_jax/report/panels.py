"""Report figures beyond the slice views: a Figure 7-S style panel and cross-validation boxplots (PNG).

Figure 7-S of the CEREBRUM-7T project page (Svanera et al., Human Brain Mapping 2021,
doi:10.1002/hbm.25636) shows a slice of the test image, the same slice with the manual label of one class
(vessels) overlaid, and the network's probability map of that class. ``plot_class_panel`` draws that for
any class, on the slice across each voxel axis that holds the most voxels of the class in the reference.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: figures go to files only

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cerebrum_jax.report.figures import save_figure


def busiest_slice(mask: np.ndarray, axis: int) -> int:
    """Index along ``axis`` of the slice with the most voxels of ``mask`` (the centre if it is empty)."""
    counts = np.asarray(mask, bool).sum(axis=tuple(a for a in range(3) if a != axis))
    return int(np.argmax(counts)) if counts.any() else mask.shape[axis] // 2


def plot_class_panel(image, ref_labels, prob, k: int, name: str, path, *, spacing=None) -> Path:
    """Image | image + reference label of class ``k`` | probability of class ``k`` (0-1), one row per axis.

    image, ref_labels (class indices), prob: (D, H, W) on one grid; spacing (3,) mm sets each slice's
    aspect ratio. Slices are transposed so that the first remaining axis runs left-right.
    """
    image, prob = np.asarray(image, np.float32), np.asarray(prob, np.float32)
    mask = np.asarray(ref_labels) == k
    if not (image.shape == mask.shape == prob.shape) or image.ndim != 3:
        raise ValueError(f"image {image.shape}, labels and probability map must share one 3-D shape")
    s = np.ones(3) if spacing is None else np.asarray(spacing, float)
    lo, hi = np.percentile(image, [1, 99]) if image.size else (0.0, 1.0)
    grey = {"cmap": "gray", "vmin": float(lo), "vmax": float(hi if hi > lo else lo + 1)}
    fig, axes = plt.subplots(3, 3, figsize=(9, 9))
    for axis in range(3):
        i = busiest_slice(mask, axis)
        others = [a for a in range(3) if a != axis]
        aspect = s[others[1]] / s[others[0]]
        img, lab, p = (np.take(v, i, axis=axis).T for v in (image, mask, prob))
        for ax in axes[axis]:
            ax.imshow(img, origin="lower", aspect=aspect, **grey)
            ax.set(xticks=[], yticks=[])
        axes[axis, 1].imshow(
            np.ma.masked_where(~lab, lab), origin="lower", aspect=aspect, cmap="autumn", alpha=0.8
        )
        shown = axes[axis, 2].imshow(
            np.ma.masked_less(p, 0.01), origin="lower", aspect=aspect, cmap="hot", vmin=0, vmax=1
        )
        axes[axis, 0].set_ylabel(f"axis {axis}, slice {i}")
    for ax, title in zip(axes[0], ("image", f"manual {name}", f"P({name})"), strict=True):
        ax.set_title(title)
    fig.colorbar(shown, ax=axes[:, 2], shrink=0.6, label=f"P({name})")
    return save_figure(fig, path, dpi=80)


def plot_cv_boxplots(results: list[dict], path, surface_records: dict | None = None) -> Path:
    """Per-class boxplots across folds (one point per fold on top): Dice, HD95 (mm) and, when given, the
    mean absolute surface distance (mm).

    results: the folds' metrics.json contents (``metrics.evaluate`` + fold); a None value (n/a) is left
    out. surface_records: {fold: ``surface_report.write_class_surfaces`` records}.
    """
    names = [n for n in results[0]["classes"] if n != "background"]
    panels = [("dice", "Dice"), ("hd95_mm", "HD95 (mm)")]
    values = {
        key: [[r["classes"][n][key] for r in results if r["classes"][n].get(key) is not None] for n in names]
        for key, _ in panels
    }
    if surface_records:
        panels.append(("surface", "mean |surface distance| (mm)"))
        values["surface"] = [
            [
                rec["distance_mm"]["mean_abs"]
                for recs in surface_records.values()
                for rec in recs
                if rec["class"] == n and rec["distance_mm"] is not None
            ]
            for n in names
        ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8))
    for ax, (key, title) in zip(np.atleast_1d(axes), panels, strict=True):
        data = values[key]
        ax.boxplot([d if d else [np.nan] for d in data], tick_labels=names, widths=0.5)
        for j, d in enumerate(data, start=1):
            ax.plot(np.full(len(d), j) + np.linspace(-0.08, 0.08, len(d)), d, "o", ms=4, alpha=0.7)
        ax.set_title(title)
        ax.tick_params(axis="x", labelrotation=30)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"across {len(results)} folds")
    fig.tight_layout()
    return save_figure(fig, path, dpi=80)
