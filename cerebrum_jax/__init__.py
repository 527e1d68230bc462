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
(``from cerebrum_jax.segment import forward_fn, prepare``). Every name is imported on first use
(PEP 562), so ``import cerebrum_jax`` (and the command line's start, which must be able to answer a
Ctrl-C with its own line from its first instant) costs no jax, scipy, optax or orbax import.
"""

import importlib
import sys
import types

# name -> module, imported on first access
_LAZY = {
    "LossConfig": "losses",
    "balanced_class_weights": "losses",
    "dice_loss": "losses",
    "loss_terms": "losses",
    "soft_dice_per_class": "losses",
    "weighted_cross_entropy": "losses",
    "Cerebrum7T": "model",
    "ModelConfig": "model",
    "apply": "model",
    "init_params": "model",
    "probabilities": "model",
    "segment": "segment",  # the function, not its module: see _Package
    "labels_from": "segment",
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


class _Package(types.ModuleType):
    """The package module. Importing the submodule ``cerebrum_jax.segment`` would bind the package's
    ``segment`` to that module (the import system sets it after loading); the function's name wins."""

    def __setattr__(self, name, value):
        if name == "segment" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name == "__version__":  # pyproject.toml's, through importlib.metadata (20 ms: not at start-up)
        from cerebrum_jax.shipped import version

        globals()[name] = version()
        return globals()[name]
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'cerebrum_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"cerebrum_jax.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
