"""Tolerances for tests that compare two programs computing the same thing (streamed vs plain step,
sharded vs one device, 2 processes vs 1, chunked vs whole convolution): one definition for every test.

Why not fixed absolute numbers: XLA:CPU picks its kernels, and with them the order of float sums, by the
host's vector extensions (AVX2 on one CI host, AVX-512/AMX on another), so such programs agree to float
rounding relative to the scale of what they sum, differently on each host. A tolerance here follows
from that scale: a fraction of the array's own largest value, or (where a result is ill-conditioned in
its inputs: Adam's first update near a zero gradient, an argmax near a tie) from what the inputs'
tolerance allows the result to move.
"""

from __future__ import annotations

import jax
import numpy as np
import optax

EPS32 = float(np.finfo(np.float32).eps)
ADAM_EPS = 1e-8  # optax.adam's default eps
MU_PER_GRAD = 0.1  # 1 - b1 (optax.adam's default b1 0.9): Adam's first moment after one step from zero


def assert_close_to_scale(actual, desired, rtol: float, err_msg: str = "") -> None:
    """|actual - desired| <= rtol * max|desired| everywhere: relative to the array's scale. A sum of
    terms of both signs (a convolution, a gradient) carries the rounding of its largest terms, so where
    it cancels to near zero an elementwise relative tolerance would ask for more than float32 gives;
    an array that is exactly zero must stay exactly zero."""
    desired = np.asarray(desired)
    atol = rtol * float(np.max(np.abs(desired))) if desired.size else 0.0
    np.testing.assert_allclose(np.asarray(actual), desired, rtol=0, atol=atol, err_msg=err_msg)


def assert_leaves_close(desired, actual, rtol: float) -> None:
    """``assert_close_to_scale`` leaf by leaf of two trees of the same structure (each leaf, e.g. a
    layer's kernel or bias, at its own scale)."""
    paths, leaves = zip(*jax.tree_util.tree_flatten_with_path(desired)[0], strict=True)
    others = jax.tree_util.tree_leaves(actual)
    assert len(others) == len(leaves), f"{len(others)} leaves, {len(leaves)} expected"
    for path, x, y in zip(paths, leaves, others, strict=True):
        assert_close_to_scale(y, x, rtol, err_msg=jax.tree_util.keystr(path))


def adam_mu(opt_state):
    """Adam's first moment in an optax state (``optax.adam``'s or ``train.make_optimizer``'s, where
    frozen leaves are MaskedNodes, which have no leaves): after one step from zero, MU_PER_GRAD x the
    gradient of the trained leaves."""

    def is_adam(s):
        return isinstance(s, optax.ScaleByAdamState)

    found = [s.mu for s in jax.tree_util.tree_leaves(opt_state, is_leaf=is_adam) if is_adam(s)]
    assert len(found) == 1, f"{len(found)} Adam states in the optimizer state"
    return found[0]


def adam_update_bound(g: np.ndarray, rtol: float, lr: float) -> np.ndarray:
    """How far Adam's first update -lr g / (|g| + eps) may move (per element) when the gradient ``g`` may
    move by dg = rtol * max|g| (the leafwise tolerance of ``assert_leaves_close``): lr eps dg /
    (|g| - dg + eps)^2 where |g| > dg (the slope's largest value over [|g| - dg, |g| + dg]), 2 lr where
    the sign may flip, plus rtol * lr for the float rounding of the update itself."""
    g = np.abs(np.asarray(g, np.float64))
    dg = rtol * float(np.max(g))
    slope = lr * ADAM_EPS * dg / np.maximum(g - dg + ADAM_EPS, ADAM_EPS) ** 2
    return np.where(g > dg, np.minimum(slope, 2 * lr), 2 * lr) + rtol * lr


def assert_first_updates_close(mu, params, update, ref_update, rtol: float, lr: float) -> None:
    """The first Adam update ``update`` against ``ref_update`` (trees, e.g. new - old parameters) for
    every leaf of ``mu`` (the reference's first moment, ``adam_mu``: trained leaves only), within
    ``adam_update_bound`` of the reference gradient mu / 0.1, plus the float32 rounding of ``params``
    (the reference's new parameters) where the updates are read from them as new - old (one ulp of |p|
    on each side)."""

    def at(tree, path):
        for k in path:
            tree = tree[k.key]
        return np.asarray(tree, np.float64)

    for path, m in jax.tree_util.tree_flatten_with_path(mu)[0]:
        rounding = 2 * EPS32 * np.abs(at(params, path))
        bound = adam_update_bound(np.asarray(m) / MU_PER_GRAD, rtol, lr) + rounding
        diff = np.abs(at(update, path) - at(ref_update, path))
        name = jax.tree_util.keystr(path)
        assert np.all(diff <= bound), f"{name}: {np.max(diff - bound):.2e} over the bound"


def dice_flip_bound(flips: int, totals) -> np.ndarray:
    """How far each class's Dice 2 I / S (S = predicted + reference voxels of the class, ``totals``) may
    move when ``flips`` predicted voxels change class: I and S each move by at most ``flips``, so
    |D' - D| = 2 |dI S - I dS| / (S S') <= 2 flips (S + S / 2) / (S (S - flips)) = 3 flips / (S - flips)
    (2 I <= S); 1 (all of Dice's range) where the flips could empty the class. Zero flips: zero."""
    s = np.asarray(totals, np.float64)
    return np.where(s > flips, 3.0 * flips / np.maximum(s - flips, 1.0), 1.0)
