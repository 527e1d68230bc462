"""Losses against independent numpy references on random logits and labels."""

import numpy as np
import pytest

from cerebrum_jax.errors import InputError
from cerebrum_jax.train import losses


def _case(seed, shape=(2, 4, 6, 8), n_classes=3):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, (*shape, n_classes)).astype(np.float32)
    labels = rng.integers(0, n_classes, shape).astype(np.int32)
    return logits, labels


def _np_softmax(z):
    z = z.astype(np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _np_dice_terms(logits, labels):
    p = _np_softmax(logits).reshape(-1, logits.shape[-1])
    y = labels.ravel()
    out = []
    for k in range(logits.shape[-1]):
        tp = p[y == k, k].sum()
        fp = p[y != k, k].sum()
        fn = (1 - p[y == k, k]).sum()
        out.append((tp + 1e-7) / (tp + 1e-7 + 0.5 * fp + 0.5 * fn))
    return np.array(out)


@pytest.mark.slow
@pytest.mark.parametrize("seed,weighted", [(0, False), (1, True), (2, True)])
def test_cross_entropy_matches_numpy(seed, weighted):
    logits, labels = _case(seed)
    w = np.random.default_rng(seed + 10).uniform(0.2, 3.0, logits.shape[-1]).astype(np.float32)
    p = _np_softmax(logits)
    picked = np.take_along_axis(p, labels[..., None], -1)[..., 0]
    ref = -(np.log(picked) * (w[labels] if weighted else 1.0)).mean()
    got = losses.weighted_cross_entropy(logits, labels, w if weighted else None)
    np.testing.assert_allclose(float(got), ref, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("seed,n_classes", [(0, 2), (3, 4), (4, 8)])
def test_dice_loss_matches_numpy(seed, n_classes):
    logits, labels = _case(seed, n_classes=n_classes)
    ref = _np_dice_terms(logits, labels)
    np.testing.assert_allclose(np.asarray(losses.soft_dice_per_class(logits, labels)), ref, rtol=1e-5)
    np.testing.assert_allclose(float(losses.dice_loss(logits, labels)), (1 - ref).sum(), rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["ce", "dice", "ce+dice"])
def test_loss_terms_combine(loss):
    logits, labels = _case(5)
    w = losses.balanced_class_weights([labels], 3)
    total, m = losses.loss_terms(logits, labels, w, losses.LossConfig(loss=loss))
    expected = {"ce": m["ce"], "dice": m["dice_loss"], "ce+dice": m["ce"] + m["dice_loss"]}[loss]
    np.testing.assert_allclose(float(total), float(expected), rtol=1e-6)


@pytest.mark.parametrize("kind,power", [("balanced", 1.0), ("sqrt", 0.5), ("none", 0.0)])
def test_class_weight_kinds_weight_the_cross_entropy(kind, power):
    """class_weights "balanced" / "sqrt" / "none": the cross-entropy of loss_terms weighted by the
    balanced weights to the power 1, 1/2 and 0, checked against numpy."""
    logits, labels = _case(7)
    w = losses.balanced_class_weights([labels], 3)
    _, m = losses.loss_terms(logits, labels, w, losses.LossConfig(loss="ce", class_weights=kind))
    picked = np.take_along_axis(_np_softmax(logits), labels[..., None], -1)[..., 0]
    ref = -(np.log(picked) * (w.astype(np.float64) ** power)[labels]).mean()
    np.testing.assert_allclose(float(m["ce"]), ref, rtol=1e-5)


@pytest.mark.parametrize("thin", [(2,), (1, 2), ()])
def test_thin_class_weights_weigh_only_the_thin_classes(thin):
    """class_weights "thin": the balanced weight for the classes ``thin_classes``, 1 for the others (none
    thin: the unweighted cross-entropy), against numpy."""
    logits, labels = _case(8)
    w = losses.balanced_class_weights([labels], 3)
    cfg = losses.LossConfig(loss="ce", class_weights="thin", thin_classes=thin)
    _, m = losses.loss_terms(logits, labels, w, cfg)
    picked = np.take_along_axis(_np_softmax(logits), labels[..., None], -1)[..., 0]
    weights = np.where(np.isin(np.arange(3), thin), w.astype(np.float64), 1.0)
    np.testing.assert_allclose(float(m["ce"]), -(np.log(picked) * weights[labels]).mean(), rtol=1e-5)
    assert not np.allclose(weights, w)  # differs from "balanced" in every case here


@pytest.mark.slow
def test_perfect_prediction_has_near_zero_losses():
    _, labels = _case(6)
    logits = np.eye(3, dtype=np.float32)[labels] * 50.0
    assert float(losses.dice_loss(logits, labels)) < 1e-5
    assert float(losses.weighted_cross_entropy(logits, labels)) < 1e-5


@pytest.mark.parametrize("counts", [(10, 5, 1), (4, 4, 4), (7, 0, 3)])
def test_balanced_weights_like_sklearn(counts):
    labels = np.repeat(np.arange(3), counts)
    w = losses.balanced_class_weights([labels[: len(labels) // 2], labels[len(labels) // 2 :]], 3)
    n = sum(counts)
    for k, c in enumerate(counts):
        assert w[k] == pytest.approx(n / (3 * c) if c else 0.0, rel=1e-6)


@pytest.mark.slow
def test_hard_dice_per_class():
    ref = np.array([[0, 1, 1, 2]])
    pred = np.array([[0, 1, 2, 2]])
    d = np.asarray(losses.hard_dice_per_class(pred, ref, 4))
    np.testing.assert_allclose(d[:3], [1.0, 2 / 3, 2 / 3], rtol=1e-6)
    assert np.isnan(d[3])  # class 3 is absent from both: n/a, not a free 1.0


@pytest.mark.parametrize("kw", [{"loss": "focal"}, {"class_weights": "inverse"}])
def test_bad_loss_config(kw):
    with pytest.raises(InputError):
        losses.LossConfig(**kw)


def _np_skeleton_recall(logits, labels, skel, classes):
    p = _np_softmax(logits)
    terms = []
    for k in classes:
        on = (labels == k) & (skel == 1)
        terms.append((p[..., k][on].sum() + 1e-7) / (on.sum() + 1e-7))
    return 1.0 - np.mean(terms)


@pytest.mark.parametrize(
    "seed, classes, density",
    [(0, (1,), 0.2), (1, (1, 2), 0.05), (2, (2,), 0.0), (3, (1, 2, 3), 0.5)],  # density 0: nothing to recall
)
def test_skeleton_recall_loss_matches_numpy(seed, classes, density):
    logits, labels = _case(seed, n_classes=4)
    skel = (np.random.default_rng(seed + 20).uniform(size=labels.shape) < density).astype(np.uint8)
    got = float(losses.skeleton_recall_loss(logits, labels, skel, classes))
    np.testing.assert_allclose(got, _np_skeleton_recall(logits, labels, skel, classes), rtol=1e-5, atol=1e-7)
    assert 0.0 <= got <= 1.0
    if density == 0:
        assert got == pytest.approx(0.0, abs=1e-6)


def test_skeleton_recall_rewards_the_centre_line_only():
    """A perfect prediction on the skeleton voxels gives 0 whatever it does elsewhere; a wrong one 1."""
    labels = np.zeros((1, 4, 4, 4), np.int32)
    labels[0, :, 1:3, 1:3] = 1
    skel = np.zeros_like(labels, np.uint8)
    skel[0, :, 1, 1] = 1
    right = np.where(labels[..., None] == np.arange(2), 20.0, -20.0).astype(np.float32)
    wrong = -right
    assert float(losses.skeleton_recall_loss(right, labels, skel, (1,))) == pytest.approx(0.0, abs=1e-6)
    assert float(losses.skeleton_recall_loss(wrong, labels, skel, (1,))) == pytest.approx(1.0, abs=1e-6)
    off_skeleton = right.copy()
    off_skeleton[0, :, 2, 2] = wrong[0, :, 2, 2]  # wrong away from the centre line: no change
    assert float(losses.skeleton_recall_loss(off_skeleton, labels, skel, (1,))) == pytest.approx(0, abs=1e-6)


def test_loss_terms_add_the_weighted_skeleton_term():
    logits, labels = _case(7, n_classes=3)
    skel = (np.random.default_rng(1).uniform(size=labels.shape) < 0.3).astype(np.uint8)
    plain_cfg = losses.LossConfig("ce+dice", "none")
    skel_cfg = losses.LossConfig("ce+dice", "none", skeleton_classes=(2,), skeleton_weight=0.5)
    plain, _ = losses.loss_terms(logits, labels, None, plain_cfg)
    total, m = losses.loss_terms(logits, labels, None, skel_cfg, skel)
    expected = _np_skeleton_recall(logits, labels, skel, (2,))
    np.testing.assert_allclose(float(m["skeleton_loss"]), expected, rtol=1e-5)
    np.testing.assert_allclose(float(total), float(plain) + 0.5 * expected, rtol=1e-5)
    with pytest.raises(ValueError, match="needs a 'skeleton'"):
        losses.loss_terms(logits, labels, None, skel_cfg)
    assert "skeleton_loss" not in losses.loss_terms(logits, labels, None, plain_cfg, skel)[1]


@pytest.mark.parametrize("classes, weight", [((0,), 1.0), ((1,), -1.0)])
def test_bad_skeleton_config(classes, weight):
    with pytest.raises(InputError, match="skeleton_classes"):
        losses.LossConfig("ce+dice", skeleton_classes=classes, skeleton_weight=weight)
