"""cerebrum-jax: CEREBRUM-7T whole-volume 7T MRI segmentation and fine-tuning in JAX.

Axis convention: arrays are (batch, D, H, W, C), channels last; NIfTI volumes are read in their
stored voxel order (i, j, k) = (D, H, W) with their affine kept alongside.

Python API (pure functions on arrays)::

    import cerebrum_jax as cj
    params = cj.init_params(cj.ModelConfig(), key)                   # or cj.load_checkpoint(dir).params
    probs = cj.segment(volume, params, config)                        # (D, H, W, n_classes), sums to 1
    ckpt = cj.load_checkpoint(run + "/checkpoints/best")               # a fine-tuned model: its recorded
    probs = cj.predict_volume(ckpt.params, ckpt.config,               # preprocessing, as segment applies it
                              cj.Preprocessing.from_dict(ckpt.meta["preprocessing"]), volume, affine)
    loss, terms = cj.loss_terms(logits, labels, weights, cj.LossConfig())
    images, labels = cj.augment_batch(keys, images, labels, cj.AugmentConfig())
    step = cj.make_train_step(config, cj.LossConfig(), cj.make_optimizer(mask, 1e-4))
    cj.evaluate(pred, ref, spacing, {1: "wm", 2: "gm"})                # Dice, HD95, VS per class

``cerebrum_jax.segment`` is the function; its module stays importable as usual
(``from cerebrum_jax.segment import forward_fn, prepare``). Names from the modules that pull in
scipy, optax or orbax (augmentation, training, metrics, checkpoints) are imported on first use, so
``import cerebrum_jax`` costs only jax, flax and the model.
"""

import importlib

from cerebrum_jax.losses import (
    LossConfig,
    balanced_class_weights,
    dice_loss,
    loss_terms,
    soft_dice_per_class,
    weighted_cross_entropy,
)
from cerebrum_jax.model import Cerebrum7T, ModelConfig, apply, init_params, probabilities
from cerebrum_jax.segment import labels_from, segment  # binds cerebrum_jax.segment to the function

# name -> module, imported on first access (PEP 562). No name here equals a submodule's name, so
# importing a submodule never shadows one of them.
_LAZY = {
    "AugmentConfig": "augment",
    "augment_batch": "augment",
    "apply_params": "augment",
    "rand_params": "augment",
    "view_key": "augment",
    "make_train_step": "train",
    "make_eval_step": "train",
    "make_optimizer": "train",
    "init_state": "train",
    "dice": "metrics",
    "hd95": "metrics",
    "volumetric_similarity": "metrics",
    "evaluate": "metrics",
    "load_checkpoint": "checkpoint",
    "save_checkpoint": "checkpoint",
    "Preprocessing": "inputs",
    "ensemble": "predictor",
    "predict_volume": "predictor",
}

__all__ = [
    "Cerebrum7T",
    "ModelConfig",
    "apply",
    "init_params",
    "probabilities",
    "segment",
    "labels_from",
    "LossConfig",
    "weighted_cross_entropy",
    "soft_dice_per_class",
    "dice_loss",
    "loss_terms",
    "balanced_class_weights",
    *_LAZY,
]
__version__ = "0.1.0"


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'cerebrum_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"cerebrum_jax.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
