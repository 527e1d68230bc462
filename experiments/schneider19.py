"""The Schneider et al. (2019) experiment of CEREBRUM-7T, one fold per run, all 7 labels kept.

    cerebrum-jax finetune --config schneider19 --data /path/to/zenodo-3401388 --fold 3 --out runs/schneider19
    make finetune CONFIG=schneider19 DATA=/path/to/zenodo-3401388 FOLD=3     # one fold
    make cv CONFIG=schneider19 DATA=/path/to/zenodo-3401388                  # 4 folds + summary

The original's AHEAD recipe (github.com/rockNroll87q/cerebrum7t, fine_tuning.py; docs/DESIGN.md):
warm-up lr 1e-4 with the copied layers frozen, fine-tuning
lr 5e-4, balanced class weights, dropout, last_layer 3, dice loss, early stopping (patience 10),
reduce-on-plateau (0.25, 5, 1e-7), 30 augmented views per training volume per epoch, grid 256x352x224,
uni contrast. 8 classes (background + white matter, grey matter, CSF, ventricles, subcortical, vessels,
sagittal sinus); the original's reduced set (sagittal sinus dropped, 7 classes) is
``--labels schneider-reduced`` (or ``--drop-label 7``).
Expected: per-class Dice near the original's (WM 0.936, GM 0.892, CSF 0.851, ventricles 0.937, subcortical
0.941, vessels 0.439). The grid streams the full-resolution layers in depth slabs (``slab_rows``
automatic: 8), so a step fits a CPU or a small GPU (README, BENCHMARKS.md); runtime: hours on a GPU.
"""

from cerebrum_jax.experiment.config import TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig().override(
        __file__,
        labels="schneider",
        grid=(256, 352, 224),
        augment_views=30,
        epochs_warmup=110,
        epochs_finetune=110,
        skeleton_classes=[],  # the paper's loss: no skeleton recall term (the default adds it for vessels)
    )
