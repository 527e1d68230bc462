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

``cerebrum_jax.segment`` is the function; its module is ``cerebrum_jax.predict.segment``
(``from cerebrum_jax.predict.segment import forward_fn, prepare``). Every name is imported on first use
(PEP 562), so ``import cerebrum_jax`` (and the command line's start, which must be able to answer a
Ctrl-C with its own line from its first instant) costs no jax, scipy, optax or orbax import.

The package, one subpackage per stage, imports flowing one way (``tests/test_imports.py`` holds the
table): ``cli`` -> ``experiment`` -> ``train``, ``predict``, ``report`` -> ``parallel``, ``data``,
``evaluation`` -> ``model`` -> the base modules here (``errors``, ``choices``, ``fsafe``, ``runtime``,
``shipped``). docs/DESIGN.md draws it. Import paths from before the subpackages keep working
(``_moved``).
"""

import importlib
import sys
import types

from cerebrum_jax import _moved

# name -> module, imported on first access
_LAZY = {
    "LossConfig": "train.losses",
    "balanced_class_weights": "train.losses",
    "dice_loss": "train.losses",
    "loss_terms": "train.losses",
    "soft_dice_per_class": "train.losses",
    "weighted_cross_entropy": "train.losses",
    "Cerebrum7T": "model.network",
    "ModelConfig": "model.spec",  # no JAX for the config alone
    "apply": "model.network",
    "init_params": "model.network",
    "probabilities": "model.network",
    "segment": "predict.segment",  # the function, not its module: see _Package
    "labels_from": "predict.segment",
    "AugmentConfig": "train.augment",
    "augment_batch": "train.augment",
    "apply_params": "train.augment",
    "rand_params": "train.augment",
    "view_key": "train.augment",
    "make_train_step": "train.steps",
    "make_eval_step": "train.steps",
    "make_optimizer": "train.steps",
    "init_state": "train.steps",
    "dice": "evaluation.metrics",
    "hd95": "evaluation.metrics",
    "volumetric_similarity": "evaluation.metrics",
    "evaluate": "evaluation.metrics",
    "load_checkpoint": "model.checkpoint",
    "save_checkpoint": "model.checkpoint",
    "Preprocessing": "data.inputs",
    "ensemble": "predict.predictor",
    "predict_volume": "predict.predictor",
}


class _Package(types.ModuleType):
    """The package module. Importing the old path ``cerebrum_jax.segment`` (``_moved``) would bind the
    package's ``segment`` to that module (the import system sets it after loading); the function wins."""

    def __setattr__(self, name, value):
        if name == "segment" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
_moved.install()

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
