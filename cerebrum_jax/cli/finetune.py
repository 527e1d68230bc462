"""``cerebrum-jax finetune``: one fold (or all folds) of the fine-tuning experiment; a thin layer over
``finetune.train_and_evaluate`` / ``run_cv``. Options override the experiment config (``--config``)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from cerebrum_jax.cli.options import add_distributed_args, add_performance_args, command
from cerebrum_jax.errors import InputError, NonFiniteLoss
from cerebrum_jax.experiment.config import apply_sets, find_config, load_config
from cerebrum_jax.experiment.rundir import RunDir
from cerebrum_jax.parallel import distributed

# option dest -> config key, for the options that map one to one
DIRECT = {
    "data": "data",
    "weights": "weights",
    "epochs_warmup": "epochs_warmup",
    "epochs_finetune": "epochs_finetune",
    "augment_views": "augment_views",
    "seed": "seed",
    "labels": "labels",
    "val_subject": "val_subject",
    "contrast": "contrast",
    "layout": "layout",
    "last_layer": "last_layer",
    "loss": "loss",
    "batch_size": "batch_size",
    "test_mask": "test_mask",
    "slab_rows": "slab_rows",
    "subject_shares": "subject_shares",
}

DESCRIPTION = (
    "Leave-one-out fine-tuning as in CEREBRUM-7T: fold K tests subject K (sorted ids) and trains on "
    "the others. Warm-up with the copied layers frozen, then fine-tuning of all layers; writes "
    "OUT/fold-K/ (config, log, metrics.jsonl, checkpoints, predictions, metrics.json, report.md, "
    "figures). With --fold all, every fold and OUT/cv_summary.{json,md}."
)
EPILOG = (
    "Every input (data, labels, weights, options; with --fold all, every fold's) is checked before "
    "OUT/fold-K is created: bad input prints one line and exits with status 2, leaving nothing to "
    "clean up. A NaN/inf loss stops the run with exit status 1 and a message (also in "
    "OUT/fold-K/log.txt) naming the checkpoints left (checkpoints/best, checkpoints/last) or saying "
    "that none was written yet. Exit status 0: done; checkpoints/best holds the parameters the "
    "test subject was predicted with."
)


def add_parser(sub) -> None:
    p = command(
        sub,
        "finetune",
        run,
        help="fine-tune a checkpoint on one fold (or all folds) and evaluate the test subject",
        description=DESCRIPTION,
        epilog=EPILOG,
    )
    p.add_argument(
        "--config",
        default="demo",
        help="experiment: a NAME of the package's experiments/ (demo, schneider19, fewlabel, ...), or the "
        "path of a .py/.json file (a .py config is Python and runs as code; names are never looked up in "
        "the current directory)",
    )
    p.add_argument("--fold", default=None, help="fold K (1..N subjects) or 'all' (default: the config's)")
    p.add_argument("--out", default=None, help="output directory (default: runs/<config name>)")
    p.add_argument("--data", help="dataset root (Schneider or BIDS layout; default: the config's / demo)")
    p.add_argument(
        "--weights",
        help="initial checkpoint (default: weights/glasgow; without it weights/demo for the demo cohort, "
        "from scratch for any other data); 'none': train from scratch (random init with the config's "
        "n_filters, default 24; no warm-up phase)",
    )
    p.add_argument(
        "--test-mask",
        choices=("auto", "file", "labels", "none"),
        help="brain masks of every subject, the test subject too: file (the dataset's mask files), none "
        "(unmasked, cropped to each head's foreground box), labels (the manual labels > 0, the paper's "
        "protocol: optimistic for new subjects); default auto: file when every subject has one, else none",
    )
    _add_training_options(p)
    _add_run_options(p)


def _add_training_options(p) -> None:
    """Grid, epochs, views, seed, label map, validation subject, data, layers, loss and batch size."""
    p.add_argument("--grid", help="network grid D,H,W (multiples of 8), or 'auto' (the brain boxes)")
    p.add_argument("--epochs", type=int, help="max epochs of both phases")
    p.add_argument("--epochs-warmup", type=int, help="max epochs of the warm-up phase")
    p.add_argument("--epochs-finetune", type=int, help="max epochs of the fine-tuning phase")
    p.add_argument("--augment-views", type=int, help="random views per training volume per epoch (0: none)")
    p.add_argument(
        "--seed", type=int, help="seed of initialisation, augmentation, dropout and order (default: 0)"
    )
    p.add_argument("--labels", help="label map: a name (schneider, schneider-reduced, demo) or a dseg TSV")
    p.add_argument(
        "--drop-label",
        action="append",
        default=[],
        metavar="V[,V]",
        help="send source label V (comma list allowed; repeatable) to background, e.g. 7",
    )
    p.add_argument(
        "--merge-label",
        action="append",
        default=[],
        metavar="V,V[=NAME]",
        help="merge source labels into one class named NAME (repeatable), e.g. 3,4=fluid",
    )
    p.add_argument("--val-subject", help="hold out this training subject for validation")
    p.add_argument("--contrast", help="Schneider image contrast (uni, inv1, inv2, t1, t2s)")
    p.add_argument("--layout", help="dataset layout: auto, schneider or bids")
    p.add_argument("--last-layer", type=int, help="new weights for the last N of the 14 layers")
    p.add_argument(
        "--loss",
        help="dice (the original's multilabel soft Dice), ce (cross-entropy) or ce+dice. The class weights "
        "(config key class_weights: balanced or none) weight the cross-entropy only: with dice they have "
        "no effect, with ce+dice they weight the ce term",
    )
    p.add_argument(
        "--skeleton-classes",
        metavar="NAMES",
        help="classes whose skeleton recall (Kirchhoff et al. 2024: the soft recall of the reference's "
        "centre line, for thin structures) is added to the loss: comma-separated class names, 'auto' "
        "(the vessel-like classes of the label map: the config default) or 'none'; its weight is the "
        "config key skeleton_weight (default 1)",
    )
    p.add_argument(
        "--batch-size", type=int, help="augmented views per training step (default: 1, as the original)"
    )


def _add_run_options(p) -> None:
    """--set, --slab-rows, --resume, --no-progress, and the shared performance and multi-process options."""
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any config key (repeatable; VALUE as JSON, else text), e.g. seg_name=aseg, "
        "mask_name=brainmask (BIDS label and mask files), class_weights=none, lr_finetune=1e-5",
    )
    p.add_argument(
        "--slab-rows",
        type=int,
        metavar="N",
        help="train and validate the full-resolution layers in depth slabs of N rows (a multiple of 4): the "
        "same loss in bounded memory; 0 = the plain whole-volume step; default: automatic from the grid "
        "(slabs of 8 above 2 M voxels). Not with --mesh",
    )
    p.add_argument(
        "--subject-shares",
        type=int,
        metavar="S",
        help="deal the training subjects into S shares, each filling its own S-th of every batch's rows, so "
        "that each process reads only the subjects its rows need; default: one share per group of "
        "processes along the mesh's data axis in a --distributed run, else 1 (any subject in any row). "
        "Give it to reproduce a distributed run on one machine",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in OUT from checkpoints/last, with the run's own config (config.json): a "
        "differing key is refused, but for the performance-only --mesh, --remat, --precision, --slab-rows "
        "and --distributed",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_performance_args(  # finetune's default differs from segment's: no mesh unless asked
        p,
        mesh_help="device mesh DATAxSPACE, e.g. 1x4 (volumes and activations split along depth over 4 "
        "devices); default: the config's mesh key, None = one device, no sharding",
    )
    add_distributed_args(p)  # --distributed, --coordinator, ...


def _grid(text: str):
    if text == "auto":
        return None
    try:
        grid = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise InputError(f"expected D,H,W integers, got {text!r}", "--grid") from None
    if len(grid) != 3:
        raise InputError(f"expected 3 values D,H,W, got {text!r}", "--grid")
    return grid


def resolve(args: argparse.Namespace):
    """(config with every command-line override, fold: int or 'all', output directory)."""
    cfg = load_config(args.config)
    values = {key: getattr(args, dest) for dest, key in DIRECT.items() if getattr(args, dest) is not None}
    if args.epochs is not None:
        values.setdefault("epochs_warmup", args.epochs)
        values.setdefault("epochs_finetune", args.epochs)
    if args.grid is not None:
        values["grid"] = _grid(args.grid)
    if args.skeleton_classes is not None:
        text = args.skeleton_classes.strip()
        names = () if text == "none" else tuple(n.strip() for n in text.split(",") if n.strip())
        values["skeleton_classes"] = None if text == "auto" else names
    if args.drop_label:
        values["drop_labels"] = cfg.drop_labels + tuple(args.drop_label)
    if args.merge_label:
        values["merge_labels"] = cfg.merge_labels + tuple(args.merge_label)
    if args.mesh is not None:
        values["mesh"] = args.mesh
    if args.remat:
        values["remat"] = True
    if args.precision is not None:
        values["precision"] = args.precision
    if getattr(args, "distributed", None):
        values["distributed"] = True
    cfg = apply_sets(cfg.override("command line", **values), args.set)
    fold = args.fold
    if fold is None:
        fold = cfg.fold
    elif fold != "all":
        try:
            fold = int(fold)
        except ValueError:
            raise InputError(f"expected a fold number or 'all', got {fold!r}", "--fold") from None
    if fold != "all":
        cfg = dataclasses.replace(cfg, fold=fold)
    out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    return cfg, fold, out


@distributed.guarded("finetune")
def run(args: argparse.Namespace) -> int:
    from cerebrum_jax.experiment import finetune  # heavy imports after argument checks
    from cerebrum_jax.report import figures as report

    cfg, fold, out = resolve(args)
    if distributed.wanted(args, cfg.distributed):
        distributed.initialize(args)  # before anything creates a JAX backend
    if distributed.is_main():
        print(f"config: {find_config(args.config).absolute()}", flush=True)
    progress = not args.no_progress and distributed.is_main()
    try:
        if fold == "all":
            summary = finetune.run_cv(cfg, out, resume=args.resume, progress=progress)
            mean = summary["mean_dice"]["mean"]
            if distributed.is_main():
                print(f"cross-validation: mean Dice {report.fmt(mean)} -> {out / 'cv_summary.md'}")
        else:
            run = RunDir.fold(out, fold)
            result = finetune.train_and_evaluate(cfg, run.root, resume=args.resume, progress=progress)
            if distributed.is_main():
                print(f"fold {fold}: mean Dice {report.fmt(result['mean_dice'])} -> {run.report_md}")
    except NonFiniteLoss as e:
        print(f"cerebrum-jax finetune: {e}", file=sys.stderr)
        return 1
    return 0
