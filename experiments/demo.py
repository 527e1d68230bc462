"""The offline demo: fine-tune weights/demo on the template-derived demo cohort (4 pseudo-subjects, 3 mm).

    make finetune FOLD=3                      # = cerebrum-jax finetune --config demo --fold 3 --out runs/demo
    make cv                                   # all 4 folds + runs/demo/cv_summary.md

Built on first use in data/demo (no download); labels background / white matter / grey matter / CSF;
initial weights weights/demo (pretrained by experiments/pretrain_demo.py on another label set). Same
recipe as schneider19 (warm-up with frozen copied layers, then all layers; Adam; balanced weights;
early stopping; reduce-on-plateau; on-device augmentation) scaled to a 2-core CPU: grid 56x72x64,
few views and epochs, larger learning rates, cross-entropy + Dice.
Expected (fold 3, 2-core CPU): test mean Dice over WM/GM/CSF >= 0.85 in about 5-8 minutes.
"""

from cerebrum_jax.config import TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig().override(
        __file__,
        labels="demo",
        grid=(56, 72, 64),
        fold=3,
        loss="ce+dice",
        lr_warmup=1e-3,
        lr_finetune=5e-4,
        epochs_warmup=4,
        epochs_finetune=20,
        augment_views=4,
        patience=6,
        plateau_patience=3,
    )
