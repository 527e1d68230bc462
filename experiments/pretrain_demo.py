"""Make weights/demo: the demo's initial checkpoint, pretrained by this project on a different label set.

    .venv/bin/python experiments/pretrain_demo.py [--out weights/demo] [--epochs 30] [--n-filters 12]

Random (glorot-normal, seed 0) init -> trained on the demo's PRETRAINING cohort (data/demo-pretrain:
4 pseudo-subjects with other random seeds than the fine-tuning cohort, so no fine-tuning or test subject
is seen) with the label set labels.DEMO_PRETRAIN_LABELS (background / white matter / grey matter + CSF),
all 4 subjects for training, augmented views, Adam, ce+dice loss. The label set differs from the demo's
fine-tuning task (background / WM / GM / CSF) as Glasgow's differs from Schneider's. cerebrum.json records
all of this (meta "description", "pretraining"). Runtime: 11.4 min on the 2-core CPU while other jobs
shared it (commit 4ef04e9, cohort v2: best val Dice 0.911 on its own subjects).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import jax

from cerebrum_jax.data import datasets as data
from cerebrum_jax.data import preprocess
from cerebrum_jax.data.bids import git_commit
from cerebrum_jax.data.demo import ensure_pretrain_cohort
from cerebrum_jax.data.inputs import Preprocessing, load_subject
from cerebrum_jax.data.labels import DEMO_PRETRAIN_LABELS
from cerebrum_jax.experiment.config import LoopConfig
from cerebrum_jax.model import network as model
from cerebrum_jax.model.checkpoint import save_checkpoint
from cerebrum_jax.train import loop
from cerebrum_jax.train.augment import AugmentConfig
from cerebrum_jax.train.losses import LossConfig

GRID = (56, 72, 64)  # the demo's brain boxes (3 mm voxels) rounded up to multiples of 8


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="weights/demo")
    ap.add_argument("--data", default="data/demo-pretrain")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--n-filters", type=int, default=12)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    root = ensure_pretrain_cohort(args.data)
    labels = DEMO_PRETRAIN_LABELS
    subjects = data.find_subjects(root)
    pre = Preprocessing(mask="labels", crop="box", grid=GRID)  # as the demo weights were trained
    vols = [load_subject(s, labels, pre) for s in subjects]
    pairs = [(preprocess.zscore(v.image, v.mask), v.labels) for v in vols]  # all 4 train and validate
    schedule = LoopConfig(augment_views=args.views, patience=10, seed=args.seed)
    loss = LossConfig("ce+dice", "balanced")
    mcfg = model.ModelConfig(n_filters=args.n_filters, n_classes=labels.n_classes, dropout_rate=0.1)
    params = model.init_params(mcfg, jax.random.key(args.seed))
    phase = loop.Phase("pretrain", args.lr, args.epochs, jax.tree_util.tree_map(lambda _: False, params))
    hooks = [loop.Progress(), loop.LogLines(print)]
    params, history = loop.fit(
        schedule, loss, AugmentConfig(), mcfg, params, [phase], pairs, pairs, hooks=hooks
    )
    best = min(history, key=lambda h: h["val_loss"])
    meta = {
        "description": (
            f"cerebrum-jax demo weights: random init (seed {args.seed}) pretrained by "
            f"experiments/pretrain_demo.py on the demo pretraining cohort (classes {labels.names}); "
            "template-derived pseudo-subjects, not 7T data"
        ),
        "pretraining": {
            "cohort": "cerebrum_jax.data.demo.ensure_pretrain_cohort (seed demo.PRETRAIN_SEED)",
            "subjects": [s.id for s in subjects],
            "labels": labels.to_source_tsv(),
            "grid": list(GRID),
            "epochs_run": len(history),
            "best_epoch": best,
            "lr": args.lr,
            "augment_views": args.views,
            "loss": loss.loss,
            "seed": args.seed,
            "git_commit": git_commit(),
            "jax": jax.__version__,
            "seconds": round(time.perf_counter() - t0, 1),
        },
        # how its inputs were prepared (brain-masked by the labels, cut to the brain box): segment
        # prepares a new volume the same way, and so asks for a brain mask (--mask) rather than
        # segment an unmasked head this network never saw
        "preprocessing": pre.to_dict(),
        "train_voxel_mm": [float(z) for z in vols[0].spacing],
    }
    save_checkpoint(
        args.out,
        params,
        dataclasses.replace(mcfg),
        classes=list(labels.names),
        normalization="zscore",
        meta=meta,
        overwrite=True,
    )
    print(f"wrote {args.out}: best val loss {best['val_loss']:.4f}, val Dice {best['val_dice']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
