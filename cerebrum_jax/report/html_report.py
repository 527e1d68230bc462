"""Self-contained HTML reports (one file, every figure embedded as a data: URI, no network).

Pages without surfaces hold no script; a page with surfaces holds the 3-D viewer (``surface_viewer``):
its data as JSON and two inline scripts, plotly.js and the viewer's own, nothing loaded from elsewhere.

``write_fold_html``: a fine-tuning fold's report.html (run table, metrics table with n/a for classes absent
from both volumes, training curves, slice figures, the Figure 7-S style panel, the surfaces);
``write_cv_html``: the cross-validation summary (per-class boxplots across folds, mean ± sd table, each
fold's scores); ``write_surfaces_html``: the surfaces of the ``surfaces`` command.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from cerebrum_jax.fsafe import write_text
from cerebrum_jax.report.figures import flatten, fmt
from cerebrum_jax.report.surface_report import distance_rows
from cerebrum_jax.report.surface_viewer import viewer_html

MIME = {".png": "image/png", ".gif": "image/gif", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}
STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.4}
h1{font-size:1.6em;border-bottom:2px solid #446;padding-bottom:.2em}h2{margin-top:1.8em;color:#335}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccd;padding:.25em .6em;text-align:left}
th{background:#eef}td.num{text-align:right;font-variant-numeric:tabular-nums}td:first-child{white-space:nowrap}
figure{margin:1em 0}figcaption{font-size:.9em;color:#555}img{max-width:100%;height:auto}
.row{display:flex;flex-wrap:wrap;gap:1em;align-items:flex-start}.note{color:#744}
"""


def data_uri(path) -> str:
    """``data:<mime>;base64,...`` of an image file (PNG, GIF or JPEG)."""
    path = Path(path)
    mime = MIME.get(path.suffix.lower())
    if mime is None:
        raise ValueError(f"{path}: not an image type the report embeds ({', '.join(MIME)})")
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def esc(value) -> str:
    return html.escape(str(value))


def cell(value, digits: int = 4) -> str:
    """A table cell: a number as ``figures.fmt`` writes it (None, a class absent from both volumes, as
    n/a), anything else escaped."""
    return fmt(value, digits) if value is None or isinstance(value, float) else esc(value)


def figure(path, caption: str) -> str:
    cap = esc(caption)
    return f'<figure><img src="{data_uri(path)}" alt="{cap}"><figcaption>{cap}</figcaption></figure>'


def table(header: list[str], rows: list[list[str]], numeric_from: int = 1) -> str:
    """An HTML table; cells are already-escaped HTML; columns from ``numeric_from`` are right-aligned."""
    head = "".join(f"<th>{h}</th>" for h in header) if any(header) else ""
    body = "".join(
        "<tr>"
        + "".join(f"<td{' class=num' if j >= numeric_from else ''}>{c}</td>" for j, c in enumerate(r))
        + "</tr>"
        for r in rows
    )
    head = f"<thead><tr>{head}</tr></thead>" if head else ""
    return f"<table>{head}<tbody>{body}</tbody></table>"


def page(title: str, sections: list[str]) -> str:
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
        f"<style>{STYLE}</style></head><body><h1>{esc(title)}</h1>\n"
        + "\n".join(sections)
        + "\n</body></html>\n"
    )


def run_table(meta: dict) -> str:
    rows = [[esc(k), esc(v)] for k, v in flatten({k: v for k, v in meta.items() if k != "title"})]
    return table(["", ""], rows, numeric_from=9)


def metrics_section(metrics: dict) -> str:
    """Per-class Dice / HD95 / VS (None shown as n/a) and the mean Dice without the background."""
    rows = [
        [esc(name), cell(m.get("label", "")), cell(m["dice"]), cell(m["hd95_mm"], 2), cell(m["vs"])]
        for name, m in metrics["classes"].items()
    ]
    rows.append(["<b>mean (no background)</b>", "", f"<b>{cell(metrics.get('mean_dice'))}</b>", "", ""])
    note = '<p class="note">n/a: the class is absent from both volumes (left out of the mean).</p>'
    return "<h2>Test-subject metrics</h2>" + table(["class", "label", "Dice", "HD95 (mm)", "VS"], rows) + note


def surfaces_section(records: list[dict], folder) -> str:
    """The surface distance table, the 3-D viewer, each class's views (PNG) and turntable (GIF), and one
    line per class without a comparison."""
    folder = Path(folder)
    viewer = [
        (r["class"], json.loads((folder / r["files"]["viewer"]).read_text()))
        for r in records
        if "viewer" in r["files"]
    ]
    rows, notes = distance_rows(records)
    rows = [[esc(cell) for cell in row] for row in rows]
    notes = [f'<p class="note">{esc(name)}: {esc(note)}</p>' for name, note in notes]
    figs = []
    for r in records:
        if r["distance_mm"] is None:
            continue
        what = {"png": "manual | prediction from the left, the front and the top", "gif": "turntable"}
        pics = [figure(folder / r["files"][k], f"{r['class']}: {what[k]}") for k in what if k in r["files"]]
        gii = ", ".join(esc(r["files"][k]) for k in ("ref", "pred") if k in r["files"])
        figs.append(f"<h3>{esc(r['class'])}</h3><div class=row>{''.join(pics)}</div><p>GIfTI: {gii}</p>")
    head = ["class", "faces manual / predicted", "mean signed (mm)", "mean |d| (mm)", "95th pct |d| (mm)"]
    intro = (
        "<p>Surfaces by marching cubes in world mm; the prediction coloured by its signed distance to the "
        "manual surface (negative: inside the manual label, too thin; positive: outside, too thick).</p>"
    )
    body = (table(head, rows) if rows else "") + "".join(notes)
    return "<h2>Surfaces</h2>" + intro + body + (viewer_html(viewer) if viewer else "") + "".join(figs)


def write_fold_html(path, meta: dict, metrics: dict, figures: dict, surface_records=None, surfaces_dir=None):
    """report.html of a fold: figures {caption: PNG path} embedded, in order, after the tables."""
    sections = ["<h2>Run</h2>" + run_table(meta), metrics_section(metrics), "<h2>Figures</h2>"]
    sections += [figure(p, caption) for caption, p in figures.items()]
    if surface_records is not None:
        sections.append(surfaces_section(surface_records, surfaces_dir))
    return write_text(path, page(meta.get("title", "cerebrum-jax run report"), sections))


def write_surfaces_html(path, records: list[dict], folder, title: str):
    return write_text(path, page(title, [surfaces_section(records, folder)]))


def write_cv_html(path, summary: dict, results: list[dict], boxplots, surface_records: dict | None = None):
    """cv_summary.html: boxplots, the mean ± sd table and one row per fold (mean Dice, per-class Dice)."""
    ms = lambda s: "n/a" if s["mean"] is None else f"{s['mean']:.4f} ± {s['sd'] or 0:.4f}"  # noqa: E731
    rows = [[esc(n), ms(r["dice"]), ms(r["hd95_mm"]), ms(r["vs"])] for n, r in summary["classes"].items()]
    rows.append(["<b>mean Dice (no background)</b>", f"<b>{ms(summary['mean_dice'])}</b>", "", ""])
    names = list(results[0]["classes"])
    fold_rows = [
        [esc(r["fold"]), esc(r.get("test_subject", "")), cell(r.get("mean_dice"))]
        + [cell(r["classes"][n]["dice"]) for n in names]
        for r in results
    ]
    sections = [
        figure(boxplots, "per-class scores across folds (box: quartiles; points: folds)"),
        "<h2>Mean ± sd across folds</h2>" + table(["class", "Dice", "HD95 (mm)", "VS"], rows),
        "<h2>Folds</h2>"
        + table(["fold", "test subject", "mean Dice"] + [f"Dice {esc(n)}" for n in names], fold_rows),
    ]
    if surface_records:
        srows = [
            [
                esc(k),
                esc(rec["class"]),
                f"{rec['distance_mm']['mean']:+.2f}",
                f"{rec['distance_mm']['p95_abs']:.2f}",
            ]
            for k, recs in surface_records.items()
            for rec in recs
            if rec["distance_mm"] is not None
        ]
        head = ["fold", "class", "mean signed surface distance (mm)", "95th pct |d| (mm)"]
        sections.append("<h2>Surface distances</h2>" + table(head, srows, numeric_from=2))
    return write_text(path, page(f"Cross-validation summary (folds {summary['folds']})", sections))
