"""``cerebrum-jax surfaces``: 3-D surfaces of chosen classes of a predicted and a reference label volume."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from cerebrum_jax import fsafe
from cerebrum_jax.cli.evaluate import label_names, load_pair
from cerebrum_jax.cli.options import add_label_pair_args, command
from cerebrum_jax.data import bids
from cerebrum_jax.errors import InputError
from cerebrum_jax.evaluation import surfaces
from cerebrum_jax.report import surface_report


def add_parser(sub) -> None:
    p = command(
        sub,
        "surfaces",
        run,
        help="3-D surfaces (GIfTI), renderings and surface distances of a prediction against a reference",
        description=(
            "For each chosen class, the surfaces of REF (manual) and PRED by marching cubes, in world mm "
            "(the NIfTI affine applied), written as OUT/<prefix>_desc-<Class>_ref.surf.gii and "
            "_pred.surf.gii; PNG views (manual | prediction, from the left, front and top) and a GIF "
            "turntable (drawn with nilearn), the prediction coloured by its signed distance to the manual "
            "surface (mm); OUT/surfaces.json, surfaces.md and report.html, which holds an interactive "
            "3-D viewer (rotate, zoom; works offline). PRED and REF must share one grid."
        ),
    )
    p.add_argument("--out", required=True, metavar="OUT_DIR", help="output directory (created if needed)")
    add_label_pair_args(
        p,
        labels_help="dseg.tsv naming the label values "
        "(default: the dseg.tsv beside PRED if any, else numbers)",
    )
    p.add_argument(
        "--classes",
        action="append",
        metavar="NAMES",
        help="comma-separated class names or label values (repeatable; default: white matter, grey matter "
        "and vessels where named, else every label present)",
    )
    p.add_argument("--max-faces", type=int, default=surfaces.MAX_FACES, help="triangles per GIfTI surface")
    p.add_argument("--frames", type=int, default=12, help="frames of the turntable GIF")
    p.add_argument("--no-render", action="store_true", help="only the GIfTI surfaces and distances")


def labels_table(args, pred_path: Path) -> Path | None:
    """--labels, else the dseg.tsv beside PRED when there is one, else None (label values as names)."""
    beside = pred_path.parent / "dseg.tsv"
    return Path(args.labels) if args.labels else (beside if beside.is_file() else None)


def run(args: argparse.Namespace) -> int:
    if args.max_faces < 100 or args.frames < 1:
        raise InputError("needs --max-faces >= 100 and --frames >= 1", "--max-faces/--frames")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError("exists and is not a directory", out)
    pred, ref, ref_img = load_pair(args.pred, args.ref)
    present = sorted(set(np.unique(pred).tolist()) | set(np.unique(ref).tolist()))
    names = label_names(labels_table(args, Path(args.pred)), present)
    requested = [c for item in args.classes or [] for c in item.split(",") if c.strip()]
    try:
        classes = surfaces.resolve_classes(requested or None, names, present)
    except ValueError as e:
        raise InputError(str(e), "--classes") from None
    space = bids.split_name(Path(args.pred).name)[0].get("space")
    prefix = bids.derivative_prefix(args.pred, space=space)
    records = surface_report.write_class_surfaces(
        out,
        prefix,
        ref,
        pred,
        ref_img.affine,
        classes,
        max_faces=args.max_faces,
        render=not args.no_render,
        frames=args.frames,
    )
    text = surface_report.surfaces_markdown(records)
    from cerebrum_jax.report import html_report

    html_report.write_surfaces_html(out / "report.html", records, out, f"surfaces of {Path(args.pred).name}")
    fsafe.write_text(out / "surfaces.md", f"# Surfaces: {args.pred} against {args.ref}\n\n{text}")
    print(text, end="")
    print(f"wrote {len(records)} class(es) to {out}")
    return 0
