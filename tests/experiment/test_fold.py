"""A fold's choices resolved against its data: the start weights, the loss's thin classes, the
augmentation in millimetres."""

import dataclasses

import pytest

from cerebrum_jax.errors import InputError
from cerebrum_jax.experiment import fold
from cerebrum_jax.experiment.config import TrainConfig
from cerebrum_jax.train.augment import AugmentConfig
from cerebrum_jax.train.losses import LossConfig

NAMES = ("background", "white matter", "grey matter", "vessels", "sagittal sinus")


@pytest.mark.parametrize(
    "classes, expected",
    [
        (None, (3, 4)),  # automatic: the vessel-like classes
        ((), ()),
        (("grey matter",), (2,)),
        (("sagittal sinus", "vessels"), (4, 3)),
    ],
)
def test_fold_loss_config_resolves_the_skeleton_classes(classes, expected):
    loss = fold.fold_loss_config(LossConfig("ce+dice", skeleton_weight=0.5), classes, NAMES)
    assert loss.skeleton_classes == expected and loss.skeleton_weight == 0.5
    assert loss.uses_skeleton == bool(expected)
    assert loss.thin_classes == (3, 4)  # what class_weights "thin" weighs: the vessel-like classes


@pytest.mark.parametrize("classes", [("arteries",), ("background",)])
def test_fold_loss_config_refuses_what_is_not_a_foreground_class(classes):
    with pytest.raises(InputError, match="not a foreground class"):
        fold.fold_loss_config(LossConfig(), classes, NAMES)


def test_no_thin_class_no_skeleton_term():
    assert not fold.fold_loss_config(LossConfig(), None, ("background", "white matter")).uses_skeleton


def test_fold_augment_config_keeps_the_millimetres():
    base = AugmentConfig()
    assert fold.fold_augment_config(base, None, (2.5, 2.5, 2.5)) is base
    got = fold.fold_augment_config(base, 0.63, (2.52, 1.26, 2.52))
    assert got.max_shift_vox == pytest.approx((2.5, 7.5, 2.5))  # (10, 15, 10) voxels of 0.63 mm
    assert got.elastic_sigmas == pytest.approx(
        tuple(s * (0.25 + 0.5 + 0.25) / 3 for s in base.elastic_sigmas)
    )
    assert got.gaussian_weight == pytest.approx(base.gaussian_weight / 3)
    finer = fold.fold_augment_config(base, 0.63, (0.315,) * 3)  # smaller voxels: more voxels, no more noise
    assert (
        finer.max_shift_vox == pytest.approx((20, 30, 20)) and finer.gaussian_weight == base.gaussian_weight
    )
    assert (
        dataclasses.replace(
            got,
            max_shift_vox=base.max_shift_vox,
            elastic_sigmas=base.elastic_sigmas,
            gaussian_weight=base.gaussian_weight,
        )
        == base
    )  # nothing else changes


def test_start_weights(tmp_path, monkeypatch):
    """weights/demo starts only the demo: another dataset without the Glasgow weights trains from
    scratch, and says so; given weights and found Glasgow weights are used."""
    monkeypatch.chdir(tmp_path)
    lines = []
    init = TrainConfig().init_config
    assert fold.start_weights(init, demo=False, log=lines.append) == "none"
    assert "training from scratch at n_filters 24" in lines[0] and "--weights weights/demo" in lines[0]
    assert fold.start_weights(init, demo=True, log=lines.append) is None  # the demo's own default
    given = dataclasses.replace(init, weights="my/ckpt")
    assert fold.start_weights(given, demo=False, log=lines.append) == "my/ckpt"
    (tmp_path / "weights" / "glasgow").mkdir(parents=True)
    assert fold.start_weights(init, demo=False, log=lines.append) == str(tmp_path / "weights" / "glasgow")
    assert len(lines) == 1


@pytest.mark.parametrize(
    "mirror,lr_axes,want",
    [("none", (0, 1), ()), ("all", (2,), (0, 1, 2)), ("lr", (1, 1, 1), (1,)), ("lr", (0,), (0,))],
)
def test_fold_mirroring_axes(mirror, lr_axes, want):
    base = AugmentConfig(p_flip=0.3)
    got = fold.fold_mirroring(base, mirror, lr_axes)
    assert got.flip_axes == want and got.p_flip == 0.3
    assert dataclasses.replace(got, flip_axes=()) == base  # nothing else changes


def test_fold_mirroring_refuses_training_images_in_different_orientations():
    with pytest.raises(InputError, match=r"left-right axes differ \(voxel axes \[0, 2\]\)") as e:
        fold.fold_mirroring(AugmentConfig(), "lr", (0, 2, 0))
    assert "augment_mirror" in str(e.value)
