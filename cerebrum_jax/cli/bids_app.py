"""``cerebrum-jax bids BIDS_DIR OUTPUT_DIR participant|group``: the BIDS App (``experiment.bids_app``).

The participant level segments each image with ``segment``'s own functions (the same checks, predictor and
writer); one image that fails does not stop the others: it gets a row in OUTPUT_DIR/failures.tsv, and the
exit status is the number of images that failed (at most 125), 0 when all were segmented.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cerebrum_jax.cli import options
from cerebrum_jax.cli import segment as seg
from cerebrum_jax.data import bids, labels
from cerebrum_jax.errors import InputError
from cerebrum_jax.experiment import bids_app
from cerebrum_jax.fsafe import dir_lock

DESCRIPTION = (
    "The BIDS App form (as fMRIPrep, MRIQC): 'participant' segments every subject's anat T1w or UNIT1 image "
    "(NIfTI or MGH/MGZ) into OUTPUT_DIR/sub-X[/ses-Y]/anat/ as a BIDS derivative dataset "
    "(<entities>_space-orig_desc-cerebrum_dseg.nii.gz, probseg, JSON sidecars; dseg.tsv and "
    "dataset_description.json at the top), skipping images already done unless --overwrite; 'group' "
    "writes OUTPUT_DIR/group_volumes.tsv (mm^3 per class and subject) and OUTPUT_DIR/group.html."
)
EPILOG = (
    "Exit status: 0 when every image was segmented; otherwise the number that failed (at most 125), each "
    "named with its reason in OUTPUT_DIR/failures.tsv; 2 for bad options or data before any work. "
    "Example: cerebrum-jax bids /data/ds /data/ds/derivatives/cerebrum-jax participant "
    "--participant-label 01 02"
)


def add_parser(sub) -> None:
    p = options.command(
        sub, "bids", run, help="the BIDS App: BIDS_DIR OUTPUT_DIR participant|group", description=DESCRIPTION,
        epilog=EPILOG,
    )  # fmt: skip
    p.add_argument(
        "bids_dir", metavar="BIDS_DIR", help="the raw BIDS dataset (with dataset_description.json)"
    )
    p.add_argument(
        "output_dir",
        metavar="OUTPUT_DIR",
        help="the derivative dataset written (e.g. BIDS_DIR/derivatives/cerebrum-jax)",
    )
    p.add_argument(
        "analysis_level", choices=["participant", "group"], help="participant: segment; group: summarise"
    )
    p.add_argument(
        "--participant-label",
        nargs="+",
        metavar="LABEL",
        help="subjects to segment (01 or sub-01); default all",
    )
    p.add_argument(
        "--session-label", nargs="+", metavar="LABEL", help="sessions to segment (1 or ses-1); default all"
    )
    p.add_argument(
        "--bids-filter-file",
        metavar="FILE",
        help='JSON as fMRIPrep reads it: {"t1w": {"acquisition": "mp2rage", "suffix": "UNIT1"}}',
    )
    p.add_argument(
        "--weights",
        nargs="+",
        metavar="CKPT_DIR",
        help="checkpoint(s), as segment takes them; default: weights/glasgow, else weights/demo",
    )
    p.add_argument("--overwrite", action="store_true", help="segment images whose outputs exist again")
    p.add_argument("--no-probseg", action="store_true", help="write labels only (no probability maps)")
    seg.add_tta_args(p)  # --tta, --no-tta, --tta-axes as segment takes them
    # what segment's functions read from args, fixed here
    p.set_defaults(mask=None, normalize=None, mesh=None, precision=None, remat=False)  # fmt: skip


def check_dirs(args: argparse.Namespace) -> tuple[Path, Path]:
    """(BIDS_DIR, OUTPUT_DIR), checked: a raw dataset, and an output that is not it nor inside its data."""
    bids_dir, out = Path(args.bids_dir), Path(args.output_dir)
    if not bids_dir.is_dir():
        raise InputError("BIDS_DIR is not a directory", bids_dir)
    if not (bids_dir / "dataset_description.json").is_file():
        raise InputError("no dataset_description.json: not a BIDS dataset's root", bids_dir)
    bids.read_description(bids_dir)
    if out.exists() and not out.is_dir():
        raise InputError("exists and is not a directory", out)
    if out.resolve() == bids_dir.resolve():
        raise InputError("OUTPUT_DIR is BIDS_DIR: derivatives go in a folder of their own", out)
    return bids_dir, out


def run(args: argparse.Namespace) -> int:
    bids_dir, out = check_dirs(args)
    if args.analysis_level == "group":
        classes, rows = bids_app.volume_rows(out)
        table, page = bids_app.write_group(out, classes, rows)
        print(f"{out}: {len(rows)} label maps -> {table.name}, {page.name}", flush=True)
        return 0
    subjects = bids_app.check_labels(args.participant_label, "--participant-label")
    sessions = bids_app.check_labels(args.session_label, "--session-label")
    images = bids_app.find_images(bids_dir, subjects, sessions, bids_app.read_filter(args.bids_filter_file))
    models, mesh = seg.load_models(args, len(images))
    if out.is_dir():
        seg.check_out(out, models[0][1].classes)
    out.mkdir(parents=True, exist_ok=True)
    for path, _, m in models:
        print(f"weights: {path} ({m.config.n_classes} classes, {m.pre.describe()})", flush=True)
    with dir_lock(out, "bids"):
        return participant(args, images, models, mesh, out)


def participant(args, images, models, mesh, out: Path) -> int:
    """Segment each image not done yet; failures.tsv and the exit status say which failed."""
    failures, done, tried = [], 0, []
    for n, image in enumerate(images, start=1):
        where = f"[{n}/{len(images)}] sub-{image.subject}" + (
            f" ses-{image.session}" if image.session else ""
        )
        place = image.out_dir(out)
        dseg = seg.output_files(place, seg.output_stem(image.path), probseg=False)[-1]
        if dseg.is_file() and not args.overwrite:
            print(
                f"{where}: {image.path.name} done before, skipped (--overwrite segments it again)", flush=True
            )
            continue
        tried.append(image)
        try:
            seg.check_outputs(
                image.path, place, not args.no_probseg, (image.path,)
            )  # the input: read once, below
            place.mkdir(parents=True, exist_ok=True)
            seg.segment_one(args, models, mesh, place, image.path, None)
            done += 1
        except (InputError, OSError, ValueError) as e:  # this image's fault: the others go on
            failures.append((image, str(e)))
            print(f"{where}: failed: {' '.join(str(e).split())}", flush=True)
    labels.write_dseg(out / "dseg.tsv", models[0][1].classes)
    bids.write_segment_description(out, [image.path for image in images])
    bids_app.update_failures(out / "failures.tsv", tried, failures)
    print(f"{out}: {done} segmented, {len(failures)} failed of {len(images)} images", flush=True)
    return min(len(failures), 125)
