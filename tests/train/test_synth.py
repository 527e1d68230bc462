"""Label-conditioned intensity randomisation: its pure operations against numpy / scipy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage

from cerebrum_jax.train import synth


def test_class_intensities_are_each_class_mean_plus_its_spread():
    labels = np.array([[[0, 1, 2, 1]]], np.int32)
    means, stds = jnp.array([0.1, 0.5, 0.9]), jnp.array([0.0, 0.2, 0.4])
    noise = jnp.array([[[1.0, -1.0, 0.5, 2.0]]])
    got = np.asarray(synth.class_intensities(labels, means, stds, noise))
    np.testing.assert_allclose(got, [[[0.1, 0.3, 1.1, 0.9]]], atol=1e-6)


@pytest.mark.parametrize("sigma", [0.5, 1.0, 1.5])
def test_gaussian_blur_matches_scipy(sigma):
    rng = np.random.default_rng(0)
    v = rng.normal(size=(10, 12, 9)).astype(np.float32)
    got = np.asarray(synth.gaussian_blur(jnp.asarray(v), jnp.float32(sigma)))
    want = scipy.ndimage.gaussian_filter(v.astype(np.float64), sigma, mode="nearest", truncate=3 / sigma)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_gaussian_blur_of_zero_sigma_is_the_identity_and_keeps_constants():
    v = jnp.asarray(np.random.default_rng(1).normal(size=(6, 7, 8)).astype(np.float32))
    np.testing.assert_allclose(np.asarray(synth.gaussian_blur(v, jnp.float32(0.0))), np.asarray(v), atol=1e-6)
    c = jnp.full((5, 5, 5), 3.0)
    np.testing.assert_allclose(np.asarray(synth.gaussian_blur(c, jnp.float32(1.2))), 3.0, rtol=1e-6)


def test_smooth_gain_is_positive_smooth_and_one_for_a_zero_grid():
    grid = jax.random.normal(jax.random.key(0), (4, 4, 4)) * 0.3
    gain = np.asarray(synth.smooth_gain(grid, (16, 20, 12)))
    assert gain.shape == (16, 20, 12) and (gain > 0).all()
    log = np.log(gain)
    for axis in range(3):  # slow: a step between neighbours is a small part of its range (noise: ~80 %)
        assert np.abs(np.diff(log, axis=axis)).max() < 0.4 * np.ptp(log)
    np.testing.assert_allclose(np.asarray(synth.smooth_gain(jnp.zeros((4, 4, 4)), (8, 8, 8))), 1.0)


def test_match_moments():
    rng = np.random.default_rng(2)
    v, ref = rng.normal(3, 2, (6, 6, 6)), rng.normal(-1, 0.5, (6, 6, 6))
    mask = rng.uniform(size=(6, 6, 6)) < 0.5
    got = np.asarray(synth.match_moments(jnp.asarray(v), jnp.asarray(ref), jnp.asarray(mask)))
    assert got[mask].mean() == pytest.approx(ref[mask].mean(), abs=1e-5)
    assert got[mask].std() == pytest.approx(ref[mask].std(), rel=1e-4)
    np.testing.assert_allclose(np.corrcoef(got.ravel(), v.ravel())[0, 1], 1.0, atol=1e-6)  # affine map
