"""The shared tolerances of tests/tolerances.py hold for what they bound and still catch real errors."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tolerances import adam_update_bound, assert_close_to_scale, dice_flip_bound

LR = 1e-3


def test_adam_update_bound_holds_for_optax_and_catches_a_wrong_update():
    """The bound holds for optax's own first update of gradients that differ within the tolerance (near
    zero too) and is far tighter than a wrong update where the gradient is not near zero."""
    rng = np.random.default_rng(0)
    g = np.concatenate([rng.normal(0, 1e-3, 200), rng.normal(0, 1e-8, 50), [0.0, 1e-12]]).astype(np.float32)
    rtol = 1e-5
    moved = (g + rng.uniform(-1, 1, g.shape) * rtol * np.max(np.abs(g))).astype(np.float32)

    def first_update(grad):
        tx = optax.adam(LR)
        updates, _ = tx.update(jnp.asarray(grad), tx.init(jnp.zeros_like(grad)))
        return np.asarray(updates, np.float64)

    bound = adam_update_bound(g, rtol, LR)
    assert np.all(np.abs(first_update(moved) - first_update(g)) <= bound)
    large = np.abs(g) > 1e-4
    assert np.all(bound[large] < 1e-3 * LR)  # a 0.1 % error of the update is caught there


def test_close_to_scale_allows_rounding_of_the_largest_terms_only():
    """A cancelling sum near zero may carry the rounding of the array's largest values; a 1e-4 error of
    one element does not pass, nor does a nonzero where the reference is exactly zero."""
    ref = np.array([30.0, -2.0, 1e-6], np.float32)
    assert_close_to_scale(ref + np.float32([0, 0, 2e-4]), ref, 1e-5)  # 30 * 1e-5 = 3e-4 at the zero
    with pytest.raises(AssertionError):
        assert_close_to_scale(ref * np.float32([1, 1 + 1e-3, 1]), ref, 1e-5)
    with pytest.raises(AssertionError):
        assert_close_to_scale(np.float32([0, 1e-30]), np.zeros(2, np.float32), 1e-5)


def test_dice_flip_bound_holds_for_the_worst_flips():
    """Flipping k predicted voxels moves a class's Dice by no more than dice_flip_bound; no flip, none."""
    rng = np.random.default_rng(1)
    for _ in range(200):
        n, k = int(rng.integers(20, 200)), int(rng.integers(0, 6))
        ref, pred = rng.random(n) < rng.random(), rng.random(n) < rng.random()
        flipped = pred.copy()
        flipped[rng.choice(n, k, replace=False)] ^= True

        def dice(p, r=ref):
            return 2 * np.sum(p & r) / max(np.sum(p) + np.sum(r), 1)

        total = int(pred.sum() + ref.sum())
        assert abs(dice(flipped) - dice(pred)) <= dice_flip_bound(k, total) + 1e-12
    assert dice_flip_bound(0, 50) == 0.0
