"""The input normalisation of a fine-tuning fold: the policy (which kind, and why) and its application to
the fold's subjects, from the pure operations of ``data.preprocess`` (``zscore``, ``voxelwise_stats``,
``voxelwise_zscore``)."""

from __future__ import annotations

import numpy as np

from cerebrum_jax.choices import FOLD_NORMALIZATIONS
from cerebrum_jax.data.preprocess import voxelwise_stats, voxelwise_zscore, zscore


def resolve_normalization(requested: str, checkpoint_normalization: str) -> tuple[str, str]:
    """(kind, why): the normalisation a fine-tuning fold uses, "zscore" or "voxelwise", and why.

    ``requested`` is the config's ``normalization``: "zscore" or "voxelwise" as they are; "auto" takes
    ``checkpoint_normalization`` (the initial checkpoint's): "voxelwise" -> voxelwise (the volumes are
    recomputed from the fold's training subjects, never the checkpoint's own), "zscore" -> zscore (the
    Glasgow model converted without --mean/--std), "none" -> zscore (a network on raw scanner units;
    fine-tuning always normalises, and retrains every layer it does not freeze on the new input).
    """
    if requested in FOLD_NORMALIZATIONS:
        return requested, "set in the config"
    if requested != "auto":
        raise ValueError(f"normalization must be auto or one of {FOLD_NORMALIZATIONS}, not {requested!r}")
    if checkpoint_normalization == "voxelwise":
        return "voxelwise", "auto: the initial checkpoint's (volumes recomputed from the training subjects)"
    if checkpoint_normalization == "none":
        return "zscore", "auto: the initial checkpoint declares none (raw input); fine-tuning z-scores"
    return "zscore", "auto: the initial checkpoint's"


def normalise_fold(subjects: list[dict], train: list[dict], kind: str, combine=None) -> dict | None:
    """Set "x" (D, H, W) float32, the network input, on every ``load_subject`` dict of ``subjects``.

    "zscore": each image z-scored with the statistics inside its own brain mask. "voxelwise": every
    image normalised voxel by voxel with the mean and std volumes of the images of ``train`` (give it
    the fold's TRAINING subjects only, never a validation-only or the test subject) as ``load_subject``
    returns them: on the network grid, zero outside the brain mask; ``combine``: see
    ``voxelwise_stats``, for a process that holds only some of them. Returns those volumes {"mean",
    "std"} (float32, std 0 replaced by 1, as the original; for ``checkpoint.save_checkpoint``), or None
    for "zscore".
    """
    if kind == "zscore":
        for d in subjects:
            d["x"] = zscore(d["image"], d["mask"])
        return None
    if kind != "voxelwise":
        raise ValueError(f"normalization must be one of {FOLD_NORMALIZATIONS}, not {kind!r}")
    mean, std = voxelwise_stats((d["image"] for d in train), combine)
    std = np.where(std == 0, 1.0, std).astype(np.float32)
    for d in subjects:
        d["x"] = voxelwise_zscore(d["image"], mean, std)
    return {"mean": mean, "std": std}


def describe_normalization(kind: str, why: str, train_ids, grid, mask: str = "file") -> str:
    """A fold's input normalisation in words (for its report): kind, what it is computed from, why.
    ``mask``: the fold's mask kind (``inputs.Preprocessing.mask``); "none" z-scores inside the head
    foreground of a box crop (``inputs.foreground``), not a brain mask."""
    if kind == "voxelwise":
        what = f"mean/std volumes of {', '.join(train_ids)} on the {'x'.join(map(str, grid))} grid"
    elif mask == "none":
        what = "per volume, inside its head foreground (no brain mask)"
    else:
        what = "per volume, inside its brain mask"
    return f"{kind} ({what}; {why})"
