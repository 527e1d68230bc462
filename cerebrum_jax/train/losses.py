"""Losses and soft metrics of the fine-tuning recipe of the original (github.com/rockNroll87q/cerebrum7t,
fine_tuning.py; Svanera et al. 2021, doi:10.1002/hbm.25636; docs/DESIGN.md).

All functions take logits (B, D, H, W, C) float and integer labels (B, D, H, W) holding class indices
0..C-1, and return float32 scalars (or (C,) vectors). Probabilities are ``softmax(logits)``; the
cross-entropy uses ``log_softmax`` so it stays finite for confident wrong predictions.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from cerebrum_jax.errors import InputError

SMOOTH = 1e-7  # the original's dice_coef_multilabel smoothing term
LOSSES = ("ce", "dice", "ce+dice")
CLASS_WEIGHTS = ("balanced", "sqrt", "thin", "none")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Which loss to train with (static under jit: frozen and hashable).

    loss: "ce" (weighted categorical cross-entropy), "dice" (the original's multilabel Dice, a Tversky
    loss with alpha = beta = 0.5) or "ce+dice" (their sum). class_weights: "balanced" (from training
    label frequencies, see ``balanced_class_weights``), "sqrt" (their square roots: a rare class weighs
    less than balanced), "thin" (the balanced weight for the classes of ``thin_classes``, 1 for every
    other class) or "none" (all 1); they weight the cross-entropy (``ce_weights``).
    skeleton_classes: class indices whose skeleton recall (``skeleton_recall_loss``) is added to the
    loss, times ``skeleton_weight``; () = no such term (the batch then needs no "skeleton").
    thin_classes: the class indices class_weights "thin" weighs (the vessel-like classes of a fold).
    """

    @property
    def uses_skeleton(self) -> bool:
        return bool(self.skeleton_classes) and self.skeleton_weight > 0

    loss: str = "dice"
    class_weights: str = "balanced"
    skeleton_classes: tuple[int, ...] = ()
    skeleton_weight: float = 1.0
    thin_classes: tuple[int, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "skeleton_classes", tuple(int(k) for k in self.skeleton_classes))
        object.__setattr__(self, "thin_classes", tuple(int(k) for k in self.thin_classes))
        if any(k < 1 for k in self.skeleton_classes) or not self.skeleton_weight >= 0:
            raise InputError(
                "skeleton_classes must be foreground class indices (>= 1) and skeleton_weight >= 0",
                "skeleton_classes",
            )
        if self.loss not in LOSSES:
            raise InputError(f"unknown loss {self.loss!r}; use one of {', '.join(LOSSES)}", "loss")
        if self.class_weights not in CLASS_WEIGHTS:
            raise InputError(
                f"unknown class_weights {self.class_weights!r}; use one of {', '.join(CLASS_WEIGHTS)}",
                "class_weights",
            )


def _check(logits, labels) -> None:
    if logits.ndim != 5 or labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"logits (B, D, H, W, C) and labels (B, D, H, W) expected, got {logits.shape}, {labels.shape}"
        )


def weighted_cross_entropy(logits, labels, class_weights=None) -> jax.Array:
    """Mean over voxels of -w[y] log softmax(logits)[y] (Keras's weighted categorical cross-entropy).

    class_weights: (C,) or None (all 1). The mean is over voxels, not normalised by the weights, as Keras
    applies ``class_weight`` as per-sample weights of a mean.
    """
    _check(logits, labels)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    if class_weights is not None:
        picked = picked * jnp.asarray(class_weights, jnp.float32)[labels]
    return -jnp.mean(picked)


def soft_confusion(logits, labels) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Soft true positives, false positives, false negatives per class, each (C,), summed over the batch."""
    _check(logits, labels)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
    axes = tuple(range(probs.ndim - 1))
    tp = jnp.sum(probs * onehot, axis=axes)
    fp = jnp.sum(probs * (1.0 - onehot), axis=axes)
    fn = jnp.sum((1.0 - probs) * onehot, axis=axes)
    return tp, fp, fn


def soft_dice_per_class(logits, labels) -> jax.Array:
    """(TP + eps) / (TP + eps + 0.5 FP + 0.5 FN) per class, (C,), on soft predictions."""
    tp, fp, fn = soft_confusion(logits, labels)
    return (tp + SMOOTH) / (tp + SMOOTH + 0.5 * fp + 0.5 * fn)


def dice_loss(logits, labels) -> jax.Array:
    """The original's dice_coef_multilabel: sum over classes of 1 - soft Dice (range 0..C)."""
    return jnp.sum(1.0 - soft_dice_per_class(logits, labels))


def skeleton_sums(logits, labels, skeleton) -> tuple[jax.Array, jax.Array]:
    """(hit, count), each (C,): per class k, the summed softmax probability of k over the skeleton voxels
    of class k, and the number of those voxels. skeleton (B, D, H, W) 0/1: the tubed skeleton of the
    reference (``skeleton.tubed_skeleton``), each voxel's class its label's."""
    _check(logits, labels)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    on = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32) * skeleton[..., None].astype(jnp.float32)
    axes = tuple(range(probs.ndim - 1))
    return jnp.sum(probs * on, axis=axes), jnp.sum(on, axis=axes)


def skeleton_recall_from_sums(hit, count, classes) -> jax.Array:
    """1 - the mean soft recall (hit + eps) / (count + eps) over ``classes`` (indices), a scalar in [0, 1]:
    a class with no skeleton voxel in the batch counts as recalled (its term is 0)."""
    k = jnp.asarray(classes, jnp.int32)
    return 1.0 - jnp.mean((hit[k] + SMOOTH) / (count[k] + SMOOTH))


def skeleton_recall_loss(logits, labels, skeleton, classes) -> jax.Array:
    """Skeleton recall loss (Kirchhoff et al., ECCV 2024, doi:10.1007/978-3-031-72980-5_13): 1 - the mean
    over ``classes`` of the soft recall of each class's tubed reference skeleton, a scalar in [0, 1].
    Thin classes (vessels) are rewarded for their centre lines, which the voxel-counting Dice and
    cross-entropy of a thin class barely see; the skeleton is computed once per volume on the host, so
    the term costs one product and sum per step."""
    return skeleton_recall_from_sums(*skeleton_sums(logits, labels, skeleton), classes)


def ce_weights(class_weights, kind: str, thin=()):
    """The cross-entropy's weights, (C,) or None, from the balanced ``class_weights`` of the batch for
    ``LossConfig.class_weights`` ``kind``: "balanced" as they are, "sqrt" their square roots, "thin" as
    they are for the classes ``thin`` and 1 for the others, "none" None."""
    if kind == "none" or class_weights is None:
        return None
    if kind == "thin":
        is_thin = jnp.zeros(jnp.shape(class_weights), bool).at[jnp.asarray(thin, jnp.int32)].set(True)
        return jnp.where(is_thin, class_weights, 1.0)
    return jnp.sqrt(class_weights) if kind == "sqrt" else class_weights


def loss_terms(logits, labels, class_weights, cfg: LossConfig, skeleton=None) -> tuple[jax.Array, dict]:
    """(total loss, {"loss", "ce", "dice_loss"} (+ "skeleton_loss")) for ``cfg``; ce and dice_loss are
    always reported, skeleton_loss when ``cfg.uses_skeleton`` (then ``skeleton`` (B, D, H, W) is needed)."""
    ce = weighted_cross_entropy(
        logits, labels, ce_weights(class_weights, cfg.class_weights, cfg.thin_classes)
    )
    dl = dice_loss(logits, labels)
    total = {"ce": ce, "dice": dl, "ce+dice": ce + dl}[cfg.loss]
    metrics = {"ce": ce, "dice_loss": dl}
    if cfg.uses_skeleton:
        if skeleton is None:
            raise ValueError("the loss has a skeleton recall term: the batch needs a 'skeleton'")
        metrics["skeleton_loss"] = skeleton_recall_loss(logits, labels, skeleton, cfg.skeleton_classes)
        total = total + cfg.skeleton_weight * metrics["skeleton_loss"]
    return total, {"loss": total, **metrics}


def hard_dice_per_class(pred, labels, n_classes: int) -> jax.Array:
    """Dice of argmax labels per class, (C,); NaN where a class is absent from both (n/a: nothing to find
    or miss; ``np.nanmean`` leaves it out of means, as ``metrics.evaluate`` does)."""
    p = jax.nn.one_hot(pred, n_classes, dtype=jnp.float32)
    r = jax.nn.one_hot(labels, n_classes, dtype=jnp.float32)
    axes = tuple(range(p.ndim - 1))
    inter, total = jnp.sum(p * r, axis=axes), jnp.sum(p + r, axis=axes)
    return jnp.where(total > 0, 2.0 * inter / jnp.maximum(total, 1.0), jnp.nan)


def class_counts(labels, n_classes: int) -> np.ndarray:
    """Voxels of each class, (C,) float64, in one integer class-index array."""
    return np.bincount(np.asarray(labels).ravel(), minlength=n_classes)[:n_classes].astype(np.float64)


def balanced_class_weights(label_volumes, n_classes: int) -> np.ndarray:
    """sklearn's 'balanced' weights n_voxels / (n_classes * count_k), (C,) float32, from training labels.

    label_volumes: iterable of integer class-index arrays (``balanced_weights`` of their summed
    ``class_counts``).
    """
    return balanced_weights(sum((class_counts(v, n_classes) for v in label_volumes), np.zeros(n_classes)))


def balanced_weights(counts) -> np.ndarray:
    """sklearn's 'balanced' weights, (C,) float32, from the voxels of each class ``counts`` (C,) (e.g.
    summed across processes). A class with no voxel gets weight 0 (it cannot contribute to the
    cross-entropy anyway) rather than infinity."""
    counts = np.asarray(counts, np.float64)
    total = counts.sum()
    weights = np.where(counts > 0, total / (len(counts) * np.maximum(counts, 1)), 0.0)
    return weights.astype(np.float32)
