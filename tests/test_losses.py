"""Losses against independent numpy references on random logits and labels."""

import numpy as np
import pytest

from cerebrum_jax import losses
from cerebrum_jax.errors import InputError


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
