"""The surfaces of a comparison as files and text: per class the GIfTI surfaces
(``evaluation.surfaces``), the PNG views and GIF turntable (``surface_views``), the 3-D viewer's data
(``surface_viewer``), ``surfaces.json``; the distance table for the Markdown and HTML reports."""

from __future__ import annotations

import json
from pathlib import Path

from cerebrum_jax.evaluation.surfaces import MAX_FACES, class_tags, compare_class, write_gifti
from cerebrum_jax.fsafe import write_text
from cerebrum_jax.report import surface_viewer, surface_views


def write_class_surfaces(
    out_dir,
    prefix: str,
    ref_labels,
    pred_labels,
    affine,
    classes: dict[int, str],
    *,
    max_faces: int = MAX_FACES,
    render: bool = True,
    frames: int = 12,
) -> list[dict]:
    """GIfTI surfaces (and, with ``render``, the PNG views, the GIF turntable and the 3-D viewer's data) of
    each class in ``out_dir``.

    classes: {label value: name}. Returns one record per class (also written to ``surfaces.json``): class,
    label, faces {ref, pred}, distance_mm (``distance_stats`` or None), files {ref, pred, png, gif, viewer}
    (names in ``out_dir``) and note (None, or the line saying why a class has no comparison).
    """
    out_dir = Path(out_dir)
    records, tags = [], class_tags(classes)
    for value, name in classes.items():
        got = compare_class(ref_labels, pred_labels, value, affine, max_faces)
        stem = f"{prefix}_desc-{tags[value]}"
        rec = {"class": name, "label": int(value), "faces": {}, "distance_mm": got["stats"], "files": {}}
        rec["note"] = got["note"]
        for key in ("ref", "pred"):
            if got[key] is not None:
                fname = f"{stem}_{key}.surf.gii"
                write_gifti(
                    out_dir / fname, *got[key], {"Name": f"{name} ({key})", "AnatomicalStructure": name}
                )
                rec["files"][key], rec["faces"][key] = fname, int(len(got[key][1]))
        if render and got["stats"] is not None:
            rec["files"]["png"] = surface_views.render_views(out_dir / f"{stem}_surfaces.png", got, name).name
            rec["files"]["gif"] = surface_views.render_turntable(
                out_dir / f"{stem}_turntable.gif", got, name, frames=frames
            ).name
            viewer = json.dumps(surface_viewer.viewer_data(got))
            rec["files"]["viewer"] = write_text(out_dir / f"{stem}_viewer.json", viewer + "\n").name
        records.append(rec)
    write_text(out_dir / "surfaces.json", json.dumps(records, indent=2) + "\n")
    return records


def distance_rows(records: list[dict]) -> tuple[list[list[str]], list[tuple[str, str]]]:
    """The per-class surface distance table of ``write_class_surfaces``'s records, as plain text for the
    Markdown and the HTML reports: (rows [class, faces ref / pred, mean signed, mean abs, 95th pct abs],
    (class, note) of each class without a comparison)."""
    rows, notes = [], []
    for r in records:
        if r["distance_mm"] is None:
            notes.append((r["class"], r["note"]))
            continue
        d, f = r["distance_mm"], r["faces"]
        rows.append(
            [
                r["class"],
                f"{f['ref']} / {f['pred']}",
                f"{d['mean']:+.2f}",
                f"{d['mean_abs']:.2f}",
                f"{d['p95_abs']:.2f}",
            ]
        )
    return rows, notes


def surfaces_markdown(records: list[dict]) -> str:
    """A Markdown table of the per-class surface distances; a class without comparison gets its one line."""
    rows, notes = distance_rows(records)
    lines = [
        "| class | faces ref / pred | mean signed (mm) | mean abs (mm) | 95th pct abs (mm) |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += [""] + [f"- {name}: {note}" for name, note in notes] if notes else []
    return "\n".join(lines) + "\n"
