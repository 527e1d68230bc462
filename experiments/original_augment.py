"""The original CEREBRUM-7T augmentation pipeline in numpy/scipy + elasticdeform, for benchmarking.

Follows the original code (github.com/rockNroll87q/cerebrum7t; docs/DESIGN.md): offline, one
geometric op (translation by
integer voxels, mirror, or rotation by an integer angle in a random pair of axes: cubic spline +
mirror for the image, nearest + constant 0 for labels) with probability 1/2 each, then always an
elastic deformation (elasticdeform, 3 or 4 control points per axis, sigma 2 or 3 voxels, spline order
5 for the image, 0 for labels, mirror), image clipped at 0; then one online intensity op (salt and
pepper p 1/4, Gaussian blend p 1/4, inhomogeneity p 1/2).

Assumptions where the reference is silent: labels are translated with the image's mirror padding
(nearest); salt & pepper picks 0.5 % of the voxels with replacement; the inhomogeneity field (twice
the volume's size per axis, built once per shape and cached, as a training run would) is a smooth
random field of amplitude 0.1 std(image), cropped at a random offset and added.

Run as a script to time one full-size view: ``python experiments/original_augment.py [D H W]``.
"""

from __future__ import annotations

import functools
import importlib.metadata
import sys
import time

import numpy as np
import scipy.ndimage

from cerebrum_jax.train.augment import spline_weights

try:
    import elasticdeform
except (ImportError, AttributeError):  # see _deform_grid_scipy
    # its 0.5.1 wheel is built against NumPy 1.x: under NumPy 2 its import raises AttributeError, not
    # ImportError, so both mean "not usable here" and the scipy implementation runs instead (slower: the
    # bench says which ran; `make bench` builds elasticdeform from source so that it loads)
    elasticdeform = None

ELASTIC = (
    f"elasticdeform {importlib.metadata.version('elasticdeform')}"
    if elasticdeform
    else "scipy fallback (elasticdeform did not load)"
)

MAX_SHIFT = (10, 15, 10)
MAX_ANGLE = 5
AXIS_PAIRS = ((0, 1), (0, 2), (1, 2))


def original_geometric(rng: np.random.Generator, image: np.ndarray, labels: np.ndarray):
    """Translation or rotation (p 1/2 each) of image (D, H, W) float32 and labels (D, H, W) int."""
    if rng.random() < 0.5:
        shift = [int(rng.integers(-m, m)) for m in MAX_SHIFT]
        image = scipy.ndimage.shift(image, shift, order=0, mode="mirror")
        labels = scipy.ndimage.shift(labels, shift, order=0, mode="mirror")
    else:
        angle = int(rng.integers(-MAX_ANGLE, MAX_ANGLE))
        axes = AXIS_PAIRS[int(rng.integers(len(AXIS_PAIRS)))]
        image = scipy.ndimage.rotate(image, angle, axes=axes, reshape=False, order=3, mode="mirror")
        labels = scipy.ndimage.rotate(labels, angle, axes=axes, reshape=False, order=0, mode="constant")
    return image, labels


def original_elastic(rng: np.random.Generator, image: np.ndarray, labels: np.ndarray):
    """elasticdeform.deform_grid with a random 3- or 4-point grid, sigma 2 or 3 voxels (seeded by rng)."""
    points = int(rng.choice([3, 4]))
    sigma = float(rng.choice([2.0, 3.0]))
    displacement = rng.standard_normal((3, points, points, points)) * sigma
    if elasticdeform is not None:
        image, labels = elasticdeform.deform_grid([image, labels], displacement, order=[5, 0], mode="mirror")
    else:
        image, labels = _deform_grid_scipy(image, labels, displacement)
    return np.clip(image, 0, None), labels


def _deform_grid_scipy(image: np.ndarray, labels: np.ndarray, displacement: np.ndarray):
    """What elasticdeform.deform_grid computes, with scipy: output(p) = input(p + u(p)), u the cubic
    spline of the control-point displacements (3, n, n, n) over the volume; order 5 image, 0 labels.

    Fallback when the elasticdeform binary does not load (slower: full-size float64 coordinates).
    """
    n = displacement.shape[1]
    w = [spline_weights(n, s).astype(np.float64) for s in image.shape]
    u = np.einsum("cijk,iz,jy,kx->czyx", displacement, *w, optimize=True)
    u += np.indices(image.shape, dtype=np.float64)
    image = scipy.ndimage.map_coordinates(image, u, order=5, mode="mirror").astype(np.float32)
    return image, scipy.ndimage.map_coordinates(labels, u, order=0, mode="mirror")


@functools.lru_cache(maxsize=4)
def _smooth_field(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Smooth random field of twice ``shape`` per axis, unit std (built once per shape)."""
    coarse = np.random.default_rng(seed).standard_normal((6, 6, 6))
    zoom = [2 * s / 6 for s in shape]
    field = scipy.ndimage.zoom(coarse, zoom, order=3).astype(np.float32)
    return field / field.std()


def original_intensity(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """One online intensity op: salt & pepper (p 1/4), Gaussian blend (p 1/4), inhomogeneity (p 1/2)."""
    u = rng.random()
    if u < 0.25:
        image = image.copy()
        flat = image.reshape(-1)
        idx = rng.integers(0, flat.size, int(0.005 * flat.size))
        n_salt = int(0.2 * idx.size)
        lo, hi = flat.min(), flat.max()
        flat[idx[:n_salt]] = hi
        flat[idx[n_salt:]] = lo
        return image
    if u < 0.5:
        noise = rng.normal(image.mean(), image.std(), image.shape).astype(np.float32)
        return 0.8 * image + 0.2 * noise
    field = _smooth_field(image.shape)
    start = [int(rng.integers(0, s + 1)) for s in image.shape]
    crop = field[tuple(slice(a, a + s) for a, s in zip(start, image.shape, strict=True))]
    return image + 0.1 * image.std() * crop


def original_augment(rng: np.random.Generator, image: np.ndarray, labels: np.ndarray):
    """One augmented view as the original made it: image (D, H, W) float32, labels (D, H, W) int."""
    image, labels = original_geometric(rng, np.asarray(image, np.float32), np.asarray(labels))
    image, labels = original_elastic(rng, image, labels)
    return original_intensity(rng, image).astype(np.float32), labels


def main(argv: list[str]) -> None:
    shape = tuple(int(a) for a in argv[:3]) if len(argv) >= 3 else (256, 352, 224)
    rng = np.random.default_rng(0)
    image = rng.random(shape, dtype=np.float32)
    labels = rng.integers(0, 7, shape).astype(np.int32)
    _smooth_field(shape)  # built once per training run, not per view
    for step in ("geometric", "elastic", "intensity"):
        t = time.perf_counter()
        if step == "geometric":
            image, labels = original_geometric(rng, image, labels)
        elif step == "elastic":
            image, labels = original_elastic(rng, image, labels)
        else:
            image = original_intensity(rng, image)
        print(f"{step}: {time.perf_counter() - t:.1f} s", flush=True)
    t = time.perf_counter()
    original_augment(np.random.default_rng(1), image, labels)
    backend = "elasticdeform" if elasticdeform is not None else "scipy fallback"
    print(f"original_augment ({backend}), one {shape} view: {time.perf_counter() - t:.1f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
