"""Tests of cerebrum_jax.train.augment on small volumes (16 x 20 x 12), against scipy where it has the op."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
from tolerances import assert_close_to_scale

from cerebrum_jax.errors import InputError
from cerebrum_jax.train import augment as aug

SHAPE = (16, 20, 12)
CFG = aug.AugmentConfig(chunk_slices=4)  # 4 slabs: exercises the slab loop
OFF = dataclasses.replace(
    CFG, rotate=False, translate=False, elastic=False, salt_pepper=False, gaussian=False, bias=False
)
apply_jit = jax.jit(aug.apply_params, static_argnums=3)


def sample(seed=0, shape=SHAPE, n_labels=4):
    """A smooth positive image (D, H, W, 1) float32 and labels (D, H, W) int32 in [0, n_labels)."""
    rng = np.random.default_rng(seed)
    image = scipy.ndimage.gaussian_filter(rng.random(shape), 1.5).astype(np.float32)[..., None] + 1.0
    labels = rng.integers(0, n_labels, shape).astype(np.int32)
    return image, labels


def rigid_params(angles=(0, 0, 0), shift=(0, 0, 0), cfg=CFG):
    params = aug.identity_params(cfg)
    return params._replace(
        angles_deg=jnp.asarray(angles, jnp.float32), shift_vox=jnp.asarray(shift, jnp.float32)
    )


@pytest.mark.slow
@pytest.mark.parametrize("shape,chunk", [(SHAPE, 4), (SHAPE, 16), ((8, 16, 8), 3)])
def test_identity_params_return_input_exactly(shape, chunk):
    cfg = dataclasses.replace(CFG, chunk_slices=chunk)
    image, labels = sample(1, shape)
    out, out_labels = apply_jit(aug.identity_params(cfg), image, labels, cfg)
    np.testing.assert_array_equal(np.asarray(out), image)
    np.testing.assert_array_equal(np.asarray(out_labels), labels)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_all_ops_disabled_return_input_exactly(seed):
    image, labels = sample(seed)
    out, out_labels = aug.augment(aug.view_key(seed, 0, 0, 0), image, labels, OFF)
    np.testing.assert_array_equal(np.asarray(out), image)
    np.testing.assert_array_equal(np.asarray(out_labels), labels)


RIGID_CASES = [
    ((0, 0, 0), (3, 0, 0)),
    ((0, 0, 0), (-2.5, 4.25, 1.5)),
    ((4, 0, 0), (0, 0, 0)),
    ((0, -5, 0), (0, 0, 0)),
    ((0, 0, 3.5), (0, 0, 0)),
    ((2, -3, 4), (1.5, -2, 0.5)),
]


@pytest.mark.slow
@pytest.mark.parametrize("angles,shift", RIGID_CASES)
def test_rigid_matches_scipy_affine_transform(angles, shift):
    # jax's and scipy's 'mirror' agree (reflection about edge voxel centres) at order 1, also outside
    # the volume, so the whole volume is compared.
    image, labels = sample(2)
    center = (np.asarray(SHAPE) - 1) / 2
    matrix = np.asarray(aug.affine_matrix(angles, shift, center), np.float64)
    expected = scipy.ndimage.affine_transform(
        image[..., 0], matrix[:, :3], offset=matrix[:, 3], order=1, mode="mirror"
    )
    out, out_labels = apply_jit(rigid_params(angles, shift), image, labels, CFG)
    np.testing.assert_allclose(np.asarray(out[..., 0]), expected, atol=2e-5)
    assert set(np.unique(np.asarray(out_labels))) <= set(np.unique(labels))


@pytest.mark.slow
@pytest.mark.parametrize("shift", [(1.0, -2.0, 0.25), (0.0, 0.0, 3.0)])  # no .5 ties for nearest
def test_constant_elastic_grid_equals_opposite_translation(shift):
    # one coordinate map: a displacement u everywhere samples at p + u, a shift s at p - s
    image, labels = sample(3)
    grid = jnp.broadcast_to(jnp.asarray(shift, jnp.float32)[:, None, None, None], (3, 4, 4, 4))
    by_field = apply_jit(aug.identity_params(CFG)._replace(grid=grid), image, labels, CFG)
    by_shift = apply_jit(rigid_params(shift=-np.asarray(shift)), image, labels, CFG)
    np.testing.assert_allclose(np.asarray(by_field[0]), np.asarray(by_shift[0]), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(by_field[1]), np.asarray(by_shift[1]))


@pytest.mark.slow
@pytest.mark.parametrize("n_points", [3, 4])
def test_elastic_field_interpolates_control_points(n_points):
    shape = (13, 13, 13)  # control points at integer voxels for 3 and 4 points
    grid = np.random.default_rng(n_points).standard_normal((3, n_points, n_points, n_points))
    field = np.asarray(aug.elastic_field(jnp.asarray(grid, jnp.float32), shape))
    at = np.arange(n_points) * 12 // (n_points - 1)
    assert field.shape == (3, *shape)
    np.testing.assert_allclose(field[:, at][:, :, at][:, :, :, at], grid, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(4))
def test_labels_stay_in_label_set_and_shapes_kept(seed):
    image, labels = sample(seed, n_labels=3)
    labels = labels * 2  # label set {0, 2, 4}: nearest sampling invents no value
    out, out_labels = aug.augment(aug.view_key(0, 0, 0, seed), image, labels, CFG)
    assert out.shape == image.shape and out.dtype == jnp.float32
    assert out_labels.shape == labels.shape and out_labels.dtype == labels.dtype
    assert set(np.unique(np.asarray(out_labels))) <= {0, 2, 4}


def _sampling_coords(params, shape, cfg) -> np.ndarray:
    """The input coordinates (3, D, H, W) at which ``apply_spatial`` samples the view of ``params``: the
    same map (voxel + elastic displacement, rotated about the centre, shifted), in float64."""
    center = (np.asarray(shape, np.float64) - 1) / 2
    m = np.asarray(aug.affine_matrix(params.angles_deg, params.shift_vox, center), np.float64)[:, :3]
    p = np.stack(np.meshgrid(*(np.arange(n, dtype=np.float64) for n in shape), indexing="ij"))
    if cfg.elastic:
        n, most = cfg.elastic_points[int(params.grid_index)], max(cfg.elastic_points)
        weights = [aug.spline_weights(n, size, most).astype(np.float64) for size in shape]
        p = p + np.einsum("cijk,iz,jy,kx->czyx", np.asarray(params.grid, np.float64), *weights)
    rotated = np.einsum("ij,j...->i...", m - np.eye(3), p - center[:, None, None, None])
    return p + rotated - np.asarray(params.shift_vox, np.float64)[:, None, None, None]


def _nearest(labels: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """``labels`` at the nearest voxel of ``coords`` (3, ...) as map_coordinates order 0 takes it: halves
    rounded away from zero, mode 'mirror' (reflection about the edge voxels)."""
    index = np.where(coords >= 0, np.floor(coords + 0.5), -np.floor(0.5 - coords)).astype(np.int64)
    for axis, size in enumerate(labels.shape):
        index[axis] = np.abs((index[axis] + size - 1) % (2 * size - 2) - (size - 1))
    return labels[tuple(index)]


@pytest.mark.slow
def test_batch_equals_per_sample():
    """augment_batch (vmapped) equals augment view by view: the image to float rounding (the two programs
    compute the coordinates in different orders, ~1 ulp); the nearest-neighbour labels exactly wherever
    no coordinate is within 1e-4 voxel of a rounding tie (.5): there a 1-ulp difference of the
    coordinate may pick the other neighbour in one program. Such voxels are ~6e-4 of the volume (3 axes
    x 2e-4) and are left out; the coordinates are checked to be the ones the program samples at."""
    images, labels = zip(*(sample(s) for s in range(3)), strict=True)
    images, labels = np.stack(images), np.stack(labels)
    keys = jnp.stack([aug.view_key(5, 1, s, 0) for s in range(3)])
    out, out_labels = aug.augment_batch(keys, images, labels, CFG)
    for i in range(3):
        one, one_labels = aug.augment(keys[i], images[i], labels[i], CFG)
        np.testing.assert_allclose(np.asarray(out[i]), np.asarray(one), atol=1e-5)
        q = _sampling_coords(aug.rand_params(keys[i], CFG), SHAPE, CFG)
        clear = np.all(np.abs(q - np.floor(q) - 0.5) > 1e-4, axis=0)
        assert clear.mean() > 0.99, clear.mean()
        one_labels = np.asarray(one_labels)
        np.testing.assert_array_equal(one_labels[clear], _nearest(labels[i], q)[clear])  # the same map
        np.testing.assert_array_equal(np.asarray(out_labels[i])[clear], one_labels[clear])


@pytest.mark.slow
def test_same_key_same_view_different_keys_differ():
    image, labels = sample(4)
    key = aug.view_key(3, 2, 1, 0)
    a = aug.augment(key, image, labels, CFG)
    b = aug.augment(key, image, labels, CFG)
    c = aug.augment(aug.view_key(3, 2, 1, 1), image, labels, CFG)
    np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
    np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]))
    assert not np.array_equal(np.asarray(a[0]), np.asarray(c[0]))


DRAW_CASES = [
    aug.AugmentConfig(),
    aug.AugmentConfig(rigid_mode="independent", rotation_axes="all", intensity_mode="independent"),
    aug.AugmentConfig(max_angle_deg=10.0, max_shift_vox=(2.0, 3.0, 4.0), integer=True, p_rotation=0.3),
]


@pytest.mark.slow
@pytest.mark.parametrize("cfg", DRAW_CASES)
def test_drawn_parameters_within_ranges_and_span_them(cfg):
    n = 4000
    keys = jax.random.split(jax.random.key(11), n)
    params = jax.vmap(lambda k: aug.rand_params(k, cfg))(keys)
    angles, shifts = np.asarray(params.angles_deg), np.asarray(params.shift_vox)
    rotated, shifted = np.any(angles != 0, axis=1), np.any(shifts != 0, axis=1)
    assert np.abs(angles).max() <= cfg.max_angle_deg
    assert np.abs(angles).max() >= 0.95 * cfg.max_angle_deg
    for axis, bound in enumerate(cfg.max_shift_vox):
        assert np.abs(shifts[:, axis]).max() <= bound
        assert shifts[:, axis].max() >= 0.9 * bound and shifts[:, axis].min() <= -0.9 * bound
    assert abs(rotated.mean() - cfg.p_rotation) < 0.04
    assert abs(shifted.mean() - cfg.p_translation) < 0.04
    if cfg.rigid_mode == "one":
        assert not np.any(rotated & shifted)
    if cfg.rotation_axes == "one":
        assert np.all(np.count_nonzero(angles, axis=1) <= 1)
    if cfg.integer:
        np.testing.assert_array_equal(angles, np.round(angles))
        np.testing.assert_array_equal(shifts, np.round(shifts))
    assert set(np.unique(np.asarray(params.grid_index))) == set(range(len(cfg.elastic_points)))
    std = np.asarray(params.grid).reshape(n, -1).std(axis=1)
    assert min(cfg.elastic_sigmas) * 0.6 < np.median(std) < max(cfg.elastic_sigmas) * 1.4
    flags = np.asarray(params.intensity)
    probs = np.array([cfg.p_salt_pepper, cfg.p_gaussian, cfg.p_bias])
    np.testing.assert_allclose(flags.mean(axis=0), probs, atol=0.04)
    if cfg.intensity_mode == "one":
        assert flags.sum(axis=1).max() <= 1


@pytest.mark.slow
def test_view_key_distinct_and_reproducible():
    combos = [(s, e, j, v) for s in range(2) for e in range(3) for j in range(4) for v in range(5)]
    data = {tuple(np.asarray(jax.random.key_data(aug.view_key(*c))).tolist()) for c in combos}
    assert len(data) == len(combos)
    same = [jax.random.key_data(aug.view_key(7, 1, 2, 3)) for _ in range(2)]
    np.testing.assert_array_equal(np.asarray(same[0]), np.asarray(same[1]))


@pytest.mark.slow
@pytest.mark.parametrize("amount,salt", [(0.05, 0.2), (0.1, 0.5)])
def test_salt_and_pepper_fraction_and_values(amount, salt):
    image = jnp.asarray(sample(5, (32, 32, 32))[0][..., 0])
    out = np.asarray(aug.salt_and_pepper(jax.random.key(0), image, amount, salt))
    changed = out != np.asarray(image)
    assert abs(changed.mean() - amount) < 0.2 * amount
    assert abs((out[changed] == float(image.max())).mean() - salt) < 0.1
    assert set(np.unique(out[changed])) <= {float(image.min()), float(image.max())}


@pytest.mark.slow
def test_gaussian_blend_keeps_mean_and_mixes_noise():
    image = jnp.asarray(sample(6, (32, 32, 32))[0][..., 0])
    out = np.asarray(aug.gaussian_blend(jax.random.key(1), image, 0.2))
    assert abs(out.mean() - float(image.mean())) < 0.01 * float(image.std()) + 1e-3
    residual = (out - 0.8 * np.asarray(image)) / 0.2  # should be N(mean, std) noise
    assert abs(residual.std() - float(image.std())) < 0.05 * float(image.std())


@pytest.mark.slow
@pytest.mark.parametrize("scale", [0.0, 0.3])
def test_bias_field_is_smooth_gain_above_floor(scale):
    # on a constant image with floor 0 the output is image * exp(g), g the spline of the grid, which
    # passes through the control points (at voxels 0, 4, 8, 12 of a 13-voxel axis)
    grid = jax.random.normal(jax.random.key(2), (4, 4, 4)) * scale
    out = np.asarray(aug.bias_field(jnp.full((13, 13, 13), 2.0), grid, 0.0))
    log_gain = np.log(out / 2.0)
    at = np.arange(4) * 4
    np.testing.assert_allclose(log_gain[at][:, at][:, :, at], np.asarray(grid), atol=1e-5)
    image = jnp.asarray(sample(7)[0][..., 0])
    assert np.asarray(aug.bias_field(image, grid, jnp.min(image))).min() >= float(image.min())


@pytest.mark.parametrize(
    "bad",
    [
        {"rigid_mode": "both"},
        {"rotation_axes": "two"},
        {"p_rotation": 1.5},
        {"p_rotation": 0.7, "p_translation": 0.6},
        {"p_bias": 0.9},
        {"elastic_points": (1, 3)},
        {"max_shift_vox": (1.0, 2.0)},
    ],
)
def test_bad_config_raises_input_error(bad):
    with pytest.raises(InputError, match="augmentation config"):
        aug.AugmentConfig(**bad)


@pytest.mark.slow
def test_probabilities_of_disabled_ops_do_not_count():
    cfg = aug.AugmentConfig(salt_pepper=False, bias=False, p_gaussian=1.0)
    flags = jax.vmap(lambda k: aug.rand_intensity(k, cfg)[0])(jax.random.split(jax.random.key(3), 200))
    np.testing.assert_array_equal(np.asarray(flags), np.tile([False, True, False], (200, 1)))


def test_from_dict_accepts_lists_and_rejects_unknown_keys():
    cfg = aug.AugmentConfig.from_dict({"max_shift_vox": [1, 2, 3], "elastic_points": [4]}, "demo.toml")
    assert cfg.max_shift_vox == (1, 2, 3) and hash(cfg) == hash(dataclasses.replace(cfg))
    with pytest.raises(InputError, match="demo.toml: unknown augmentation option"):
        aug.AugmentConfig.from_dict({"rotation": 5}, "demo.toml")


@pytest.mark.parametrize(
    "image_shape,label_shape,label_dtype",
    [
        ((16, 20, 12), (16, 20, 12), np.int32),
        ((16, 20, 12, 1), (16, 20, 11), np.int32),
        ((16, 20, 12, 1), (16, 20, 12), np.float32),
    ],
)
def test_wrong_shapes_rejected(image_shape, label_shape, label_dtype):
    with pytest.raises(ValueError, match="augment"):
        aug.augment(jax.random.key(0), np.zeros(image_shape, np.float32), np.zeros(label_shape, label_dtype))


def test_augment_views_equals_augment_batch_of_view_keys():
    """The loop's one-call views: the same keys (view_key) and so the same views as augment_batch (one
    compiled program instead of two: the image to float rounding of its scale, a nearest-neighbour label
    at a rounding tie may differ, see test_batch_equals_per_sample)."""
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(3, 16, 16, 16, 1)).astype(np.float32))
    labels = jnp.asarray(rng.integers(0, 3, (3, 16, 16, 16)).astype(np.int32))
    views = np.array([[2, 7, 1], [0, 4, 3]], np.int32)  # (row, subject, view)
    got = aug.augment_views(5, 100003, views, images, labels, CFG)
    keys = jnp.stack([aug.view_key(5, 100003, s, v) for _, s, v in views])
    want = aug.augment_batch(keys, images[views[:, 0]], labels[views[:, 0]], CFG)
    assert_close_to_scale(got[0], want[0], 1e-5)
    assert np.mean(np.asarray(got[1]) == np.asarray(want[1])) >= 0.999


@pytest.mark.slow
def test_extra_volume_travels_exactly_with_the_labels():
    """A skeleton carried through augment_views lands where its labels land: ``extra`` = labels == 2
    before, so after any view it must equal the view's labels == 2 voxel for voxel."""
    rng = np.random.default_rng(1)
    labels = jnp.asarray(rng.integers(0, 4, (2, 16, 16, 16)).astype(np.int32))
    images = jnp.asarray(rng.normal(size=(2, 16, 16, 16, 1)).astype(np.float32))
    extra = (labels == 2).astype(jnp.uint8)
    views = np.array([[0, 0, 1], [1, 1, 2], [1, 1, 3]], np.int32)
    x, y, e = aug.augment_views(3, 7, views, images, labels, CFG, extra)
    x0, y0 = aug.augment_views(3, 7, views, images, labels, CFG)
    assert e.dtype == jnp.uint8 and y.dtype == labels.dtype
    np.testing.assert_array_equal(np.asarray(e), np.asarray(y == 2))
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y0))  # the labels are not changed by it
    assert_close_to_scale(x, x0, 1e-6)
    assert not np.array_equal(np.asarray(y[1]), np.asarray(labels[1]))  # the views did move


SYNTH_ON = dataclasses.replace(OFF, synth=True, p_synth=1.0)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_synth_draws_a_new_image_from_the_labels_deterministically(seed):
    image, labels = sample(seed, n_labels=3)
    key = aug.view_key(seed, 0, 0, 0)
    a, la = aug.augment(key, image, labels, SYNTH_ON)
    b, _ = aug.augment(key, image, labels, SYNTH_ON)
    c, _ = aug.augment(aug.view_key(seed, 0, 0, 1), image, labels, SYNTH_ON)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # the same key, the same image
    assert not np.allclose(np.asarray(a), np.asarray(c))  # another key, other intensities
    np.testing.assert_array_equal(np.asarray(la), labels)  # labels untouched (no spatial ops here)
    a = np.asarray(a)[..., 0]
    fg = labels > 0
    # scaled to the real image's foreground moments
    assert a[fg].mean() == pytest.approx(image[..., 0][fg].mean(), abs=1e-4)
    assert a[fg].std() == pytest.approx(image[..., 0][fg].std(), rel=1e-3)
    assert np.isfinite(a).all() and not np.allclose(a, image[..., 0])


@pytest.mark.slow
def test_synth_probability_zero_or_off_leaves_the_pipeline_as_it_was():
    image, labels = sample(2)
    key = aug.view_key(0, 1, 2, 3)
    plain = aug.augment(key, image, labels, CFG)
    for cfg in (dataclasses.replace(CFG, synth=True, p_synth=0.0), dataclasses.replace(CFG, p_synth=1.0)):
        got = aug.augment(key, image, labels, cfg)
        np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(plain[0]))
        np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(plain[1]))


@pytest.mark.slow
def test_synth_applies_at_its_probability():
    image, labels = sample(3)
    cfg = dataclasses.replace(SYNTH_ON, p_synth=0.3)
    keys = jax.random.split(jax.random.key(0), 400)
    applied = np.asarray(jax.vmap(lambda k: aug.rand_params(k, cfg).synth.apply)(keys))
    assert 0.22 < applied.mean() < 0.38  # 400 draws of p 0.3: 5 standard deviations either side


@pytest.mark.parametrize("bad", [{"synth_std": -0.1}, {"synth_blur": -1}, {"p_synth": 1.5}])
def test_bad_synth_config(bad):
    with pytest.raises(InputError, match="augmentation config"):
        aug.AugmentConfig(**bad)


@pytest.mark.slow
@pytest.mark.parametrize("axes", [(0,), (2,), (0, 1, 2)])
def test_flip_mirrors_image_labels_and_skeleton_exactly(axes):
    """p_flip 1: the view is np.flip of the input along ``flip_axes`` (and nothing else moves); a
    mirrored rigid view is the mirror image of the unmirrored one with the same draw."""
    image, labels = sample(4)
    cfg = dataclasses.replace(OFF, flip_axes=axes, p_flip=1.0)
    params = aug.rand_params(jax.random.key(1), cfg)
    assert np.asarray(params.flip).tolist() == [a in axes for a in range(3)]
    extra = (labels == 1).astype(np.uint8)
    out, out_labels, out_extra = apply_jit(params, image, labels, cfg, extra)
    np.testing.assert_array_equal(np.asarray(out), np.flip(image, axes))
    np.testing.assert_array_equal(np.asarray(out_labels), np.flip(labels, axes))
    np.testing.assert_array_equal(np.asarray(out_extra), np.flip(extra, axes))
    rigid = dataclasses.replace(cfg, translate=True)
    moved = rigid_params(shift=(2, -1, 1), cfg=rigid)
    plain = apply_jit(moved, image, labels, rigid)
    mirrored = apply_jit(moved._replace(flip=params.flip), image, labels, rigid)
    np.testing.assert_array_equal(np.asarray(mirrored[1]), np.flip(np.asarray(plain[1]), axes))
    assert_close_to_scale(mirrored[0], np.flip(np.asarray(plain[0]), axes), 1e-6)


@pytest.mark.slow
def test_flip_at_its_probability_only_on_its_axes_and_off_changes_no_draw():
    cfg = dataclasses.replace(CFG, flip_axes=(1,), p_flip=0.3)
    keys = jax.random.split(jax.random.key(0), 400)
    flips = np.asarray(jax.vmap(lambda k: aug.rand_params(k, cfg).flip)(keys))
    assert not flips[:, [0, 2]].any() and 0.22 < flips[:, 1].mean() < 0.38  # 5 sd of 400 draws
    raw = lambda x: jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x  # noqa: E731
    plain = aug.rand_params(keys[0], CFG)  # adding mirroring leaves every other draw of a key as it was
    for a, b in zip(plain[:-1], aug.rand_params(keys[0], cfg)[:-1], strict=True):
        jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(raw(x)), np.asarray(raw(y))), a, b)


@pytest.mark.parametrize("bad", [{"flip_axes": (3,)}, {"flip_axes": (0, 0)}, {"p_flip": -0.1}])
def test_bad_flip_config(bad):
    with pytest.raises(InputError, match="augmentation config"):
        aug.AugmentConfig(**bad)
