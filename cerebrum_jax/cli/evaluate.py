"""``cerebrum-jax evaluate``: per-class Dice, HD95 (mm) and volumetric similarity of a segmentation."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from cerebrum_jax import fsafe
from cerebrum_jax.cli.options import add_label_pair_args, command
from cerebrum_jax.data import nifti
from cerebrum_jax.data.labels import read_dseg
from cerebrum_jax.errors import InputError
from cerebrum_jax.evaluation.metrics import evaluate, format_table


def add_parser(sub) -> None:
    p = command(
        sub,
        "evaluate",
        run,
        help="compare a predicted label volume with a reference (Dice, HD95, VS)",
        description=(
            "Per-class Dice, symmetric 95th-percentile Hausdorff distance in mm (voxel spacing from the "
            "reference's header) and volumetric similarity of PRED against REF, which must share shape, "
            "voxel size and affine (orientation and origin, to 1e-3 mm). Label values are compared "
            "as they are stored in the files. A class absent from both is n/a (not scored, left out "
            "of the means); absent from one it scores Dice 0, HD95 inf, VS 0. The mean Dice leaves out "
            "label 0 (background)."
        ),
    )
    add_label_pair_args(
        p,
        labels_help="BIDS dseg.tsv (columns index, name) naming the label values; values found in the files "
        "but missing from it are an error (default: every value present, named by its number)",
    )
    p.add_argument("--json", metavar="OUT.json", help="also write the results as JSON")


def label_names(tsv: str | Path | None, present: list[int]) -> dict[int, str]:
    """{label value: name} of the dseg.tsv ``tsv`` (``labels.read_dseg``), or of every value ``present``
    named by its number when there is none."""
    return read_dseg(tsv) if tsv is not None else {v: str(v) for v in present}


def load_labels(path: str | Path, what: str) -> tuple[np.ndarray, object]:
    """A label volume as int64 (D, H, W) and its image; InputError unless every value is an integer."""
    data, img = nifti.load_nifti(path, what=what)
    if not np.array_equal(data, np.round(data)):
        raise InputError(f"{what} has non-integer values; expected a label volume", path)
    return data.astype(np.int64), img


def load_pair(pred_path, ref_path) -> tuple[np.ndarray, np.ndarray, object]:
    """(pred, ref) int64 (D, H, W) and the reference's image; InputError unless they share one grid."""
    pred, pred_img = load_labels(pred_path, "prediction")
    ref, ref_img = load_labels(ref_path, "reference")
    nifti.check_same_grid(ref_path, ref_img, pred_path, pred_img, ref.shape, pred.shape, "the reference")
    return pred, ref, ref_img


def run(args: argparse.Namespace) -> int:
    pred, ref, ref_img = load_pair(args.pred, args.ref)
    spacing = tuple(float(z) for z in ref_img.header.get_zooms()[:3])
    present = sorted(set(np.unique(pred).tolist()) | set(np.unique(ref).tolist()))
    labels = label_names(args.labels, present)
    if args.labels:
        for path, data in ((args.pred, pred), (args.ref, ref)):
            outside = sorted(set(np.unique(data).tolist()) - set(labels))
            if outside:
                raise InputError(f"label values {outside} are not in {args.labels}", path)
    result = evaluate(pred, ref, spacing, labels)
    print(format_table(result))
    if args.json:
        text = json.dumps(result, indent=2, allow_nan=False)
        fsafe.write_text(args.json, text + "\n")
        print(f"wrote {args.json}")
    return 0
