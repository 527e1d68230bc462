"""On-device data augmentation as pure, jit-compiled JAX functions of (key, image, labels).

Replaces the original's offline pipeline (augmented copies written to disk, numpy/scipy) with random
views drawn on the accelerator that trains. Layout, MONAI style:

1. pure operations: ``affine_matrix``, ``spline_weights``, ``elastic_field``, ``resample``,
   ``gaussian_blend``, ``salt_and_pepper``, ``bias_field`` (mirroring: ``flip_axes``, in the coordinates);
2. random draws of their parameters from a key: ``rand_rigid``, ``rand_elastic``, ``rand_intensity``,
   ``synth.rand_synth`` (the label-conditioned image, its pure operations in ``synth``), ``rand_params``
   (-> ``AugmentParams``);
3. the composed pipeline: ``apply_params`` (deterministic), ``augment(key, image, labels, cfg)`` (jit,
   ``cfg`` static) and ``augment_batch`` (its ``jax.vmap`` over keys), plus ``view_key`` for the key of
   one view (seed, epoch, subject, view).

Conventions: one sample is image (D, H, W, 1) float32 and labels (D, H, W) integer class indices; a
batch adds a leading B. Coordinates and displacements are in voxels, angles in degrees.

Spatial part: the mirroring, the rigid transform (rotation about the volume centre, translation) and
the elastic displacement are composed into ONE coordinate map, evaluated slab by slab along D
(``lax.map``, so only a few (slab, H, W) float32 arrays exist at once) and sampled ONCE with
``map_coordinates`` (linear for the image, nearest for labels, mode 'mirror'), so image and labels get
exactly the same transform.
As the original (rigid first, then elastic on the rigid result), output voxel p samples the input at
    q = M (p + u(p) - c) + c - s,
M the rotation, c the centre, s the shift (content moves by +s) and u the elastic displacement.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.ndimage
from jax.scipy.ndimage import map_coordinates

from cerebrum_jax.errors import InputError
from cerebrum_jax.train import synth

# fold_in tag that separates augmentation keys from other uses of the same seed (init, dropout).
AUGMENT_TAG = 0x617567
SYNTH_TAG = 0x73796E  # the synthetic-intensity draw: fold_in of the view's key (earlier draws unchanged)
FLIP_TAG = 0x666C70  # the mirroring draw, likewise
_HIGHEST = jax.lax.Precision.HIGHEST  # coordinates up to ~350 voxels: no bf16/tf32 matmuls


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Ranges and probabilities of the augmentation (static under jit: frozen and hashable).

    Defaults are the original's (Svanera et al. 2021, doi:10.1002/hbm.25636, and its code,
    github.com/rockNroll87q/cerebrum7t; summarised in docs/DESIGN.md), with these choices:
    angles (degrees) and shifts (voxels) are continuous uniform in [-max, max] (the original drew
    integers in [-max, max); ``integer=True`` rounds ours); ``rigid_mode="one"`` applies at most one of
    rotation (``p_rotation``) or translation (``p_translation``) as the original, "independent" draws
    each; ``rotation_axes="one"`` rotates about one random axis (the original's random pair of axes),
    "all" about the three axes. The elastic control-point count is drawn from ``elastic_points`` and
    the displacement sigma (voxels) from ``elastic_sigmas``; shapes stay static because every count is
    embedded in a grid of max(elastic_points) points per axis whose extra rows get zero weight.
    ``intensity_mode="one"`` applies at most one intensity op per sample (the original's p 1/4, 1/4,
    1/2 sum to 1: exactly one), "independent" draws each. Labels use mirror edges like the image (the
    original filled rotated labels with 0). ``synth``: label-conditioned intensity randomisation
    (``synth``, off by default; the view's image replaced with probability ``p_synth`` by one drawn from
    its labels, with the ``synth_*`` ranges). ``flip_axes``: voxel axes each mirrored with probability
    ``p_flip`` (nnU-Net's mirroring; none by default, as the original: a label map with left and right
    classes must not be mirrored across the left-right axis). ``chunk_slices``: D-slab size of the
    resampling (memory vs. speed; the largest divisor of D not above it is used).
    """

    rotate: bool = True
    translate: bool = True
    rigid_mode: str = "one"
    p_rotation: float = 0.5
    p_translation: float = 0.5
    max_angle_deg: float = 5.0
    rotation_axes: str = "one"
    max_shift_vox: tuple[float, float, float] = (10.0, 15.0, 10.0)
    integer: bool = False
    elastic: bool = True
    p_elastic: float = 1.0
    elastic_points: tuple[int, ...] = (3, 4)
    elastic_sigmas: tuple[float, ...] = (2.0, 3.0)
    intensity_mode: str = "one"
    salt_pepper: bool = True
    p_salt_pepper: float = 0.25
    salt_pepper_amount: float = 0.005
    salt_fraction: float = 0.2
    gaussian: bool = True
    p_gaussian: float = 0.25
    gaussian_weight: float = 0.2
    bias: bool = True
    p_bias: float = 0.5
    bias_points: int = 4
    bias_sigma: float = 0.2
    clip_min: bool = True
    synth: bool = False
    p_synth: float = 0.5
    synth_std: float = 0.1
    synth_blur: float = 1.0
    synth_bias: float = 0.3
    synth_gamma: float = 0.3
    synth_noise: float = 0.05
    flip_axes: tuple[int, ...] = ()
    p_flip: float = 0.5
    chunk_slices: int = 16

    def __post_init__(self):
        where = "augmentation config"
        for name in ("max_shift_vox", "elastic_points", "elastic_sigmas", "flip_axes"):  # JSON/TOML lists
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in ("rigid_mode", "intensity_mode", "rotation_axes"):
            allowed = ("one", "all") if name == "rotation_axes" else ("one", "independent")
            if getattr(self, name) not in allowed:
                raise InputError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}", where)
        for name in (f.name for f in dataclasses.fields(self) if f.name.startswith("p_")):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise InputError(f"{name} must be in [0, 1], got {getattr(self, name)}", where)
        # with mode "one" the enabled ops share one draw: their probabilities must fit in [0, 1]
        rigid = self.p_rotation * self.rotate + self.p_translation * self.translate
        if self.rigid_mode == "one" and rigid > 1 + 1e-9:
            raise InputError("p_rotation + p_translation must be <= 1 with rigid_mode 'one'", where)
        intensity = self.p_salt_pepper * self.salt_pepper + self.p_gaussian * self.gaussian
        intensity += self.p_bias * self.bias
        if self.intensity_mode == "one" and intensity > 1 + 1e-9:
            raise InputError("p_salt_pepper + p_gaussian + p_bias (on) must be <= 1 in mode 'one'", where)
        if not self.elastic_points or min(self.elastic_points) < 2 or not self.elastic_sigmas:
            raise InputError("elastic_points must be counts >= 2 and elastic_sigmas non-empty", where)
        if min(self.synth_std, self.synth_blur, self.synth_bias, self.synth_gamma, self.synth_noise) < 0:
            raise InputError("synth_std, _blur, _bias, _gamma and _noise must be >= 0", where)
        if len(set(self.flip_axes)) != len(self.flip_axes) or not set(self.flip_axes) <= {0, 1, 2}:
            raise InputError(f"flip_axes must be distinct axes 0, 1, 2, got {self.flip_axes}", where)
        if len(self.max_shift_vox) != 3 or self.bias_points < 2 or self.chunk_slices < 1:
            raise InputError("max_shift_vox needs 3 values, bias_points >= 2, chunk_slices >= 1", where)

    @classmethod
    def from_dict(cls, values: dict, where: str = "augmentation config") -> AugmentConfig:
        """Build from a config mapping; an unknown key is an InputError naming it (``where``: the file)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InputError(f"unknown augmentation option(s) {unknown}; known: {sorted(known)}", where)
        return cls(**values)


class AugmentParams(NamedTuple):
    """Everything one view needs, drawn by ``rand_params`` (a pytree: vmaps over a leading batch axis).

    angles_deg (3,) rotation about axes 0, 1, 2 in degrees; shift_vox (3,) voxels; grid (3, P, P, P)
    elastic displacements in voxels at the control points (P = max(cfg.elastic_points)); grid_index ()
    int32, which entry of cfg.elastic_points is used; intensity (3,) bool: apply salt & pepper,
    Gaussian blend, bias field; bias_grid (B, B, B) log-gain at the bias control points;
    noise_key: key of the voxelwise noise; synth: the ``synth.SynthParams`` draw; flip (3,) bool (axes).
    """

    angles_deg: jax.Array
    shift_vox: jax.Array
    grid: jax.Array
    grid_index: jax.Array
    intensity: jax.Array
    bias_grid: jax.Array
    noise_key: jax.Array
    synth: synth.SynthParams
    flip: jax.Array


# ---------------------------------------------------------------- pure operations


def affine_matrix(angles_deg, shift_vox, center) -> jax.Array:
    """(3, 4) matrix [M | o] mapping output voxel coordinates to input ones: q = M p + o.

    M = R0 R1 R2, Ri the rotation by angles_deg[i] about axis i (in the plane of the other two axes),
    about ``center`` (3,) voxels; o = c - M c - shift_vox, so the content moves by +shift_vox. Same
    meaning as scipy.ndimage.affine_transform(matrix=M, offset=o).
    """
    a = jnp.deg2rad(jnp.asarray(angles_deg, jnp.float32))
    cos, sin = jnp.cos(a), jnp.sin(a)
    mats = []
    for axis in range(3):
        i, j = [k for k in range(3) if k != axis]
        r = jnp.eye(3, dtype=jnp.float32)
        r = r.at[i, i].set(cos[axis]).at[j, j].set(cos[axis])
        mats.append(r.at[i, j].set(-sin[axis]).at[j, i].set(sin[axis]))
    m = jnp.matmul(jnp.matmul(mats[0], mats[1], precision=_HIGHEST), mats[2], precision=_HIGHEST)
    center = jnp.asarray(center, jnp.float32)
    offset = center - jnp.matmul(m, center, precision=_HIGHEST) - jnp.asarray(shift_vox, jnp.float32)
    return jnp.concatenate([m, offset[:, None]], axis=1)


@functools.lru_cache(maxsize=64)
def spline_weights(n_points: int, size: int, pad_to: int | None = None) -> np.ndarray:
    """(pad_to or n_points, size) float32: cubic-spline interpolation weights of n_points control points.

    Control point k sits at voxel k (size - 1) / (n_points - 1), as in elasticdeform; row k is the
    interpolant of the k-th unit vector (scipy order 3, mirror), so values on the dense axis are
    ``weights.T @ control_values``. Rows beyond n_points are zero. Computed once with numpy at trace
    time (a constant of the compiled function, not a per-step numpy call).
    """
    x = np.arange(size, dtype=np.float64) * (n_points - 1) / max(size - 1, 1)
    rows = [
        scipy.ndimage.map_coordinates(np.eye(n_points)[k], x[None], order=3, mode="mirror")
        for k in range(n_points)
    ]
    out = np.zeros((pad_to or n_points, size), np.float32)
    out[:n_points] = np.stack(rows)
    return out


def _smooth_slab(grid, wd, wh, ww):
    """Tensor-product spline: grid (..., P, P, P), wd (P, d), wh (P, H), ww (P, W) -> (..., d, H, W)."""
    t = jnp.einsum("...ijk,iz->...zjk", grid, wd, precision=_HIGHEST)
    t = jnp.einsum("...zjk,jy->...zyk", t, wh, precision=_HIGHEST)
    return jnp.einsum("...zyk,kx->...zyx", t, ww, precision=_HIGHEST)


def elastic_field(grid_values, shape) -> jax.Array:
    """Dense displacement (3, D, H, W) voxels from control-point displacements (3, n, n, n) voxels.

    Cubic-spline interpolation of the coarse grid spread over the whole volume (as
    elasticdeform.deform_grid). Full size: for inspection and tests; ``apply_params`` builds the same
    field slab by slab.
    """
    n = grid_values.shape[1]
    wd, wh, ww = (jnp.asarray(spline_weights(n, s)) for s in shape)
    return _smooth_slab(jnp.asarray(grid_values, jnp.float32), wd, wh, ww)


def resample(volume, coords, order: int) -> jax.Array:
    """volume (D, H, W) sampled at coords (3, ...) voxels: order 1 linear, 0 nearest; mode 'mirror'.

    'mirror' reflects about the edge voxel centres (d c b | a b c d | c b a), scipy's definition;
    integer volumes (labels) stay integer and only take values present in the volume with order 0.
    """
    return map_coordinates(volume, list(coords), order=order, mode="mirror")


def gaussian_blend(key, image, weight: float = 0.2) -> jax.Array:
    """(1 - weight) image + weight N(mean(image), std(image)) voxelwise; any shape, float32."""
    noise = jax.random.normal(key, image.shape, image.dtype)
    return (1.0 - weight) * image + weight * (jnp.mean(image) + jnp.std(image) * noise)


def salt_and_pepper(key, image, amount: float = 0.005, salt_fraction: float = 0.2) -> jax.Array:
    """Each voxel independently: salt (max of image) with probability amount salt_fraction, pepper
    (min) with probability amount (1 - salt_fraction), else unchanged (one uniform draw per voxel)."""
    u = jax.random.uniform(key, image.shape)
    out = jnp.where(u < amount, jnp.min(image), image)
    return jnp.where(u < amount * salt_fraction, jnp.max(image), out)


def bias_field(image, log_gain_grid, floor) -> jax.Array:
    """Smooth multiplicative inhomogeneity: floor + (image - floor) exp(g), image (D, H, W).

    g (D, H, W) is the cubic-spline interpolation of log_gain_grid (B, B, B) over the volume; scaling
    relative to ``floor`` (the input's minimum) keeps the background level and intensities >= floor.
    """
    b = log_gain_grid.shape[0]
    wd, wh, ww = (jnp.asarray(spline_weights(b, s)) for s in image.shape)
    return floor + (image - floor) * jnp.exp(_smooth_slab(log_gain_grid, wd, wh, ww))


# ---------------------------------------------------------------- random draws


def _choose(key, probs, mode: str) -> jax.Array:
    """(len(probs),) bool: 'one' -> at most one True (op i with probability probs[i]); else independent."""
    probs = jnp.asarray(probs, jnp.float32)
    if mode == "one":
        u = jax.random.uniform(key)
        upper = jnp.cumsum(probs)
        return (u < upper) & (u >= upper - probs)
    return jax.random.uniform(key, probs.shape) < probs


def rand_rigid(key, cfg: AugmentConfig) -> tuple[jax.Array, jax.Array]:
    """Draw (angles_deg (3,), shift_vox (3,)) within the configured ranges; zeros for ops not applied."""
    k_choose, k_axis, k_angle, k_shift = jax.random.split(key, 4)
    p = (cfg.p_rotation * cfg.rotate, cfg.p_translation * cfg.translate)
    do_rot, do_shift = _choose(k_choose, p, cfg.rigid_mode)
    amax = cfg.max_angle_deg
    if cfg.rotation_axes == "one":
        axis = jax.random.randint(k_axis, (), 0, 3)
        angles = jax.nn.one_hot(axis, 3) * jax.random.uniform(k_angle, (), minval=-amax, maxval=amax)
    else:
        angles = jax.random.uniform(k_angle, (3,), minval=-amax, maxval=amax)
    smax = jnp.asarray(cfg.max_shift_vox, jnp.float32)
    shift = jax.random.uniform(k_shift, (3,), minval=-smax, maxval=smax)
    if cfg.integer:
        angles, shift = jnp.round(angles), jnp.round(shift)
    return angles * do_rot, shift * do_shift


def rand_elastic(key, cfg: AugmentConfig) -> tuple[jax.Array, jax.Array]:
    """Draw (grid (3, P, P, P) voxels, grid_index ()): N(0, sigma) displacements, sigma and the count
    chosen uniformly from cfg.elastic_sigmas / cfg.elastic_points; zeros if not applied."""
    k_apply, k_index, k_sigma, k_grid = jax.random.split(key, 4)
    p_max = max(cfg.elastic_points)
    index = jax.random.randint(k_index, (), 0, len(cfg.elastic_points))
    sigma = jnp.asarray(cfg.elastic_sigmas, jnp.float32)[
        jax.random.randint(k_sigma, (), 0, len(cfg.elastic_sigmas))
    ]
    apply = (jax.random.uniform(k_apply) < cfg.p_elastic) & cfg.elastic
    grid = jax.random.normal(k_grid, (3, p_max, p_max, p_max)) * sigma * apply
    return grid, index


def rand_intensity(key, cfg: AugmentConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Draw (flags (3,) bool [salt&pepper, gaussian, bias], bias_grid (B, B, B), noise_key)."""
    k_choose, k_bias, k_noise = jax.random.split(key, 3)
    probs = (
        cfg.p_salt_pepper * cfg.salt_pepper,
        cfg.p_gaussian * cfg.gaussian,
        cfg.p_bias * cfg.bias,
    )
    flags = _choose(k_choose, probs, cfg.intensity_mode)
    b = cfg.bias_points
    return flags, jax.random.normal(k_bias, (b, b, b)) * cfg.bias_sigma, k_noise


def rand_params(key, cfg: AugmentConfig) -> AugmentParams:
    """All parameters of one view from one key (independent sub-keys per part)."""
    k_rigid, k_elastic, k_intensity = jax.random.split(key, 3)
    angles, shift = rand_rigid(k_rigid, cfg)
    grid, index = rand_elastic(k_elastic, cfg)
    flags, bias_grid, noise_key = rand_intensity(k_intensity, cfg)
    drawn = synth.rand_synth(jax.random.fold_in(key, SYNTH_TAG), cfg)
    on = jnp.asarray([a in cfg.flip_axes for a in range(3)])
    flip = on & (jax.random.uniform(jax.random.fold_in(key, FLIP_TAG), (3,)) < cfg.p_flip)
    return AugmentParams(angles, shift, grid, index, flags, bias_grid, noise_key, drawn, flip)


def identity_params(cfg: AugmentConfig, key=None) -> AugmentParams:
    """Parameters that leave image and labels unchanged (no rotation, shift, displacement, intensity op)."""
    p, b = max(cfg.elastic_points), cfg.bias_points
    return AugmentParams(
        jnp.zeros(3, jnp.float32),
        jnp.zeros(3, jnp.float32),
        jnp.zeros((3, p, p, p), jnp.float32),
        jnp.zeros((), jnp.int32),
        jnp.zeros(3, bool),
        jnp.zeros((b, b, b), jnp.float32),
        jax.random.key(0) if key is None else key,
        synth.rand_synth(jax.random.key(0), dataclasses.replace(cfg, synth=False)),
        jnp.zeros(3, bool),
    )


# ---------------------------------------------------------------- composed pipeline


def _slab_size(depth: int, chunk: int) -> int:
    return max(c for c in range(1, min(depth, chunk) + 1) if depth % c == 0)


def apply_spatial(params: AugmentParams, volume, labels, cfg: AugmentConfig, extra=None):
    """Mirroring, rigid + elastic as one coordinate map, one resampling: volume (D, H, W) float32 (linear)
    and labels (D, H, W) int (nearest) -> same shapes. Evaluated in D-slabs to bound memory. ``extra``
    (D, H, W) 0/1 (a tubed skeleton) travels with the labels as one volume 2 labels + extra (the same
    nearest samples) and is returned third."""
    if extra is not None:
        v, packed = apply_spatial(params, volume, 2 * labels.astype(jnp.int32) + extra, cfg)
        return v, (packed // 2).astype(labels.dtype), (packed % 2).astype(extra.dtype)
    shape = volume.shape
    d, h, w = shape
    center = (jnp.asarray(shape, jnp.float32) - 1.0) / 2.0
    m_minus_i = affine_matrix(params.angles_deg, params.shift_vox, center)[:, :3] - jnp.eye(3)
    p_max = max(cfg.elastic_points)
    # the elastic count is traced: stack the padded weights of every allowed count and pick one
    weights = [
        jnp.stack([jnp.asarray(spline_weights(n, s, p_max)) for n in cfg.elastic_points])[params.grid_index]
        for s in shape
    ]
    c = _slab_size(d, cfg.chunk_slices)
    wd_slabs = weights[0].reshape(p_max, d // c, c).transpose(1, 0, 2)

    def slab(args):
        z0, wd = args
        p = jnp.stack(jnp.meshgrid(z0 + jnp.arange(c), jnp.arange(h), jnp.arange(w), indexing="ij")).astype(
            jnp.float32
        )
        if cfg.flip_axes:  # the output grid mirrored: the view is the mirror image of an unmirrored one
            p = jnp.where(params.flip[:, None, None, None], 2.0 * center[:, None, None, None] - p, p)
        if cfg.elastic:
            p = p + _smooth_slab(params.grid, wd, weights[1], weights[2])
        # q = p + (M - I)(p - c) - s written out elementwise: exact identity when M = I, s = 0, u = 0
        q = [
            p[i] + sum(m_minus_i[i, j] * (p[j] - center[j]) for j in range(3)) - params.shift_vox[i]
            for i in range(3)
        ]
        return resample(volume, q, 1), resample(labels, q, 0)

    starts = jnp.arange(0, d, c)
    out_v, out_l = jax.lax.map(slab, (starts, wd_slabs))
    return out_v.reshape(shape), out_l.reshape(shape)


def apply_intensity(params: AugmentParams, volume, floor, cfg: AugmentConfig):
    """The drawn intensity ops on volume (D, H, W) float32 (image only): bias, Gaussian, salt & pepper."""
    k_sp, k_gauss = jax.random.split(params.noise_key)
    ops = (  # (enabled, drawn, op) in the order applied; params.intensity is [salt&pepper, gauss, bias]
        (cfg.bias, 2, lambda v: bias_field(v, params.bias_grid, floor)),
        (cfg.gaussian, 1, lambda v: gaussian_blend(k_gauss, v, cfg.gaussian_weight)),
        (cfg.salt_pepper, 0, lambda v: salt_and_pepper(k_sp, v, cfg.salt_pepper_amount, cfg.salt_fraction)),
    )
    for enabled, flag, op in ops:
        if enabled:
            volume = jax.lax.cond(params.intensity[flag], op, lambda v: v, volume)
    return volume


def _check(image, labels, batched: bool):
    lead = 1 if batched else 0
    what = "batch (B, D, H, W, 1)" if batched else "sample (D, H, W, 1)"
    if image.ndim != 4 + lead or image.shape[-1] != 1:
        raise ValueError(f"augment: image must be a {what}, got shape {image.shape}")
    if labels.shape != image.shape[:-1]:
        raise ValueError(f"augment: labels must have shape {image.shape[:-1]}, got {labels.shape}")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"augment: labels must be integer class indices, got {labels.dtype}")


def apply_params(params: AugmentParams, image, labels, cfg: AugmentConfig, extra=None):
    """Deterministic view: image (D, H, W, 1) float32, labels (D, H, W) int -> the same shapes (and
    ``extra`` (D, H, W) 0/1 resampled with the labels, returned third, when given).

    Spatial resampling, then (clip_min) clip at the input's minimum, then (``cfg.synth``) the image
    drawn from the view's labels with probability p_synth (``synth.apply_synth``), then the intensity
    ops on the image. With linear interpolation the clip never acts (the original needed it after its order-5
    spline, which overshoots); the Gaussian blend may go below the minimum, as in the original, whose
    online intensity ops came after its offline clip.
    """
    volume = image[..., 0].astype(jnp.float32)
    floor = jnp.min(volume)
    spatial = apply_spatial(params, volume, labels, cfg, extra)
    volume, labels = spatial[:2]
    if cfg.clip_min:
        volume = jnp.maximum(volume, floor)
    if cfg.synth:
        volume = synth.apply_synth(params.synth, volume, labels)
        floor = jnp.where(params.synth.apply, jnp.min(volume), floor)  # a view left real keeps its floor
    volume = apply_intensity(params, volume, floor, cfg)
    return (volume[..., None], *spatial[1:])  # (image, labels) or (image, labels, extra)


@functools.partial(jax.jit, static_argnames="cfg")
def _augment(key, image, labels, cfg):
    return apply_params(rand_params(key, cfg), image, labels, cfg)


def augment(key, image, labels, cfg: AugmentConfig = AugmentConfig()):
    """One random view: image (D, H, W, 1) float32, labels (D, H, W) int -> (image, labels), same shapes.

    jit-compiled with ``cfg`` static; the same key gives the same view.
    """
    _check(image, labels, batched=False)
    return _augment(key, image, labels, cfg)


@functools.partial(jax.jit, static_argnames="cfg")
def _augment_batch(keys, images, labels, cfg, extra=None):
    # extra None is an empty pytree: vmap passes it through
    return jax.vmap(lambda k, x, y, e: apply_params(rand_params(k, cfg), x, y, cfg, e))(
        keys, images, labels, extra
    )


def augment_batch(keys, images, labels, cfg: AugmentConfig = AugmentConfig()):
    """``augment`` vmapped: keys (B,), images (B, D, H, W, 1), labels (B, D, H, W) -> same shapes."""
    _check(images, labels, batched=True)
    if keys.shape[:1] != images.shape[:1]:
        raise ValueError(f"augment_batch: {keys.shape[0]} keys for a batch of {images.shape[0]}")
    return _augment_batch(keys, images, labels, cfg)


def view_key(seed: int, epoch: int, subject_index: int, view_index: int) -> jax.Array:
    """Key of one augmented view: fold_in chain seed -> AUGMENT_TAG -> epoch -> subject -> view.

    Reproducible, and distinct (seed, epoch, subject, view) give distinct keys (fold_in hashes).
    """
    key = jax.random.fold_in(jax.random.key(seed), AUGMENT_TAG)
    for value in (epoch, subject_index, view_index):
        key = jax.random.fold_in(key, value)
    return key


@functools.partial(jax.jit, static_argnames="cfg")
def augment_views(seed, epoch, views, images, labels, cfg: AugmentConfig, extra=None):
    """The augmented views of one batch in one compiled call: ``views`` (B, 3) int32 rows of (row of
    ``images`` (N, D, H, W, 1) / ``labels`` (N, D, H, W), subject index, view index), each view keyed
    ``view_key(seed, epoch, subject, view)``: ``augment_batch`` of those rows and keys, (B, D, H, W, 1)
    and (B, D, H, W). One dispatch instead of a dozen (the key chains' fold_ins, the gathers), which
    cost 10-15 ms of the demo's 0.27 s step on a 2-core CPU. ``extra`` (N, D, H, W) 0/1 (the tubed
    skeletons) is carried through each view's spatial transform with the labels and returned third."""
    keys = jax.vmap(lambda s, v: view_key(seed, epoch, s, v))(views[:, 1], views[:, 2])
    rows = views[:, 0]
    return _augment_batch(keys, images[rows], labels[rows], cfg, None if extra is None else extra[rows])
