"""A fold's input normalisation: the policy and its application to the training subjects only."""

import numpy as np
import pytest

from cerebrum_jax.data.preprocess import zscore
from cerebrum_jax.experiment import normalization as norm


@pytest.mark.parametrize(
    "requested,ckpt,kind",
    [
        ("auto", "zscore", "zscore"),
        ("auto", "voxelwise", "voxelwise"),
        ("auto", "none", "zscore"),  # fine-tuning always normalises: raw input is not an option
        ("zscore", "voxelwise", "zscore"),
        ("voxelwise", "zscore", "voxelwise"),
    ],
)
def test_resolve_normalization(requested, ckpt, kind):
    got, why = norm.resolve_normalization(requested, ckpt)
    assert got == kind and why
    with pytest.raises(ValueError, match="normalization"):
        norm.resolve_normalization("global", ckpt)


def test_normalise_fold_voxelwise_uses_the_training_subjects_only():
    def subject(seed):
        image = np.zeros((8, 8, 8), np.float32)
        image[2:6, 2:6, 2:6] = np.random.default_rng(seed).normal(100 + seed, 10, (4, 4, 4))
        return {"image": image, "mask": image != 0}

    train, test = [subject(0), subject(1)], subject(50)
    volumes = norm.normalise_fold([*train, test], train, "voxelwise")
    images = [d["image"] for d in train]
    np.testing.assert_allclose(volumes["mean"], np.mean(images, axis=0), atol=1e-4)
    std = np.std(images, axis=0)
    assert (std == 0).any()  # the background: std 0 -> 1
    np.testing.assert_allclose(volumes["std"], np.where(std == 0, 1, std), rtol=1e-5)
    for d in (*train, test):
        np.testing.assert_allclose(d["x"], (d["image"] - volumes["mean"]) / volumes["std"], atol=1e-5)
    assert (test["x"][~test["mask"]] == 0).all()
    assert norm.normalise_fold([test], train, "zscore") is None
    np.testing.assert_array_equal(test["x"], zscore(test["image"], test["mask"]))
    with pytest.raises(ValueError, match="normalization"):
        norm.normalise_fold([test], train, "auto")
    words = norm.describe_normalization("voxelwise", "set in the config", ["sub-1", "sub-2"], (8, 8, 8))
    assert "sub-1, sub-2" in words and "8x8x8" in words
    for mask, region in (("file", "brain mask"), ("labels", "brain mask"), ("none", "head foreground")):
        assert region in norm.describe_normalization("zscore", "auto", [], (8, 8, 8), mask)
