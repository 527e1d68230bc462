"""One prediction path for ``segment`` and a fold's test subject: raw volume -> prepared input
(``inputs.prepare``, the checkpoint's recorded ``Preprocessing``) -> network (mirrored copies averaged
for test-time augmentation; several checkpoints averaged as an ensemble) -> probabilities on the
input's own grid -> the files ``export.write_segmentation`` writes. nnU-Net's fold validation and predict
command share one predictor in the same way, so what a fold measures is what a user gets.

Probabilities are (D, H, W, C) float32 on the input grid; voxels outside the network's grid are
background (probability 1 for class 0).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from typing import NamedTuple

import jax
import nibabel as nib
import numpy as np
from nibabel import processing

from cerebrum_jax import runtime
from cerebrum_jax.data import nifti
from cerebrum_jax.data.inputs import Preprocessing, cut_note, of_checkpoint, prepare, resampled
from cerebrum_jax.model import lean
from cerebrum_jax.model import network as model
from cerebrum_jax.model.network import ModelConfig
from cerebrum_jax.parallel import distributed, sharding

# ----------------------------------------------------------------------------------------------------------
# Network passes: mirroring (TTA), ensembles


def mirror_sets(axes) -> list[tuple[int, ...]]:
    """Every subset of ``axes`` (spatial axes 0..2 of (D, H, W)): the flips test-time augmentation
    averages over, the identity first. () -> [()]."""
    axes = tuple(sorted(set(int(a) for a in axes)))
    return [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]


def flip(x: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """``x`` (D, H, W[, C]) mirrored along the spatial ``axes``; flipping twice is the identity."""
    return np.flip(x, axis=axes) if axes else x


@functools.lru_cache(maxsize=16)
def forward_fn(config: ModelConfig, mesh=None) -> Callable:
    """Jit-compiled ``(params, x (B, D, H, W, 1)) -> probabilities (B, D, H, W, n_classes)`` of ``config``:
    the one forward of the package (prediction, validation of ``segment``, the benchmark).

    mesh None: one device; on a CPU backend ``lean.probabilities_lean`` (depth slabs at full resolution:
    a 256x352x224 volume within 3 GB instead of 11 GB, and about 3x faster at any size, as XLA:CPU's 2-D
    convolutions beat its 3-D ones), elsewhere ``model.probabilities``; the two agree to float rounding.
    A ``parallel.sharding`` mesh: x, the activations and the result split over it (batch over "data",
    depth over "space"), the parameters replicated. Cached per (hashable, frozen) config and mesh, so
    repeated calls on volumes of one shape reuse one compilation.
    """
    if mesh is not None:
        vol, rep = sharding.volume_sharding(mesh), sharding.replicated(mesh)

        def sharded(params, x):
            return jax.nn.softmax(model.apply(params, config, x, act_sharding=vol), axis=-1)

        options = runtime.mesh_compiler_options()
        return jax.jit(sharded, in_shardings=(rep, vol), out_shardings=vol, compiler_options=options)

    def forward(params, x):
        if jax.default_backend() == "cpu":
            return lean.probabilities_lean(params, config, x)
        return model.probabilities(params, config, x)

    return jax.jit(forward)


def forward(params: dict, config: ModelConfig, x, mesh=None) -> jax.Array:
    """Probabilities (B, D, H, W, n_classes) float32 of ``x`` (B, D, H, W, 1) by ``forward_fn``. On a
    mesh the result stays sharded (D over "space"; ``np.asarray`` gathers it, across processes
    ``distributed.gather``) and x must split evenly (``sharding.check_divisible``)."""
    if mesh is None:
        return forward_fn(config)(params, x)
    sharding.check_divisible(x.shape, mesh)
    # placed before the call: a multi-process run does not let jit split host (numpy) inputs itself
    x = jax.device_put(x, sharding.volume_sharding(mesh))
    params = jax.device_put(params, sharding.replicated(mesh))
    return forward_fn(config, mesh)(params, x)


def network_probs(params, config: ModelConfig, x: np.ndarray, *, tta_axes=(), mesh=None) -> np.ndarray:
    """Softmax probabilities (D, H, W, C) float32 of one prepared input x (D, H, W), averaged over the
    mirrored copies of ``tta_axes`` (``mirror_sets``) when given. ``mesh``: split the forward along depth
    over its devices (``forward``); None: one device."""
    total = None
    flips = mirror_sets(tta_axes)
    for axes in flips:
        xin = np.ascontiguousarray(flip(x, axes))[None, ..., None]
        p = forward(params, config, xin, mesh)
        if mesh is not None:  # across processes (--distributed) gathered: every caller writes the result
            p = distributed.gather(p)
        p = flip(np.asarray(p[0], np.float32), axes)
        total = p if total is None else total + p
    return total / len(flips)


def _probs_back(probs: np.ndarray, grid_affine: np.ndarray, shape, affine) -> np.ndarray:
    """Probabilities (.., C) on a resampled grid brought back to the source grid (``shape``, ``affine``)
    by linear interpolation, renormalised to sum 1."""
    target = nib.Nifti1Image(np.zeros(shape, np.float32), affine)
    out = np.empty(tuple(shape) + probs.shape[-1:], np.float32)
    for k in range(probs.shape[-1]):
        img = nib.Nifti1Image(probs[..., k], grid_affine)
        back = processing.resample_from_to(img, target, order=1, cval=float(k == 0))
        out[..., k] = np.asarray(back.dataobj)
    return out / np.maximum(out.sum(-1, keepdims=True), 1e-12)


def predict_volume(
    params, config, pre: Preprocessing, image, affine, mask=None, norm_volumes=None, warn=None, **kw
):
    """Probabilities (D, H, W, C) float32 of a raw ``image`` (D, H, W) on its own grid (``affine`` (4, 4)
    mm), prepared as ``pre`` says (``inputs.prepare``; ``mask`` (D, H, W) bool when ``pre`` needs one).
    ``warn(text)`` (optional) hears when the grid cuts the head (``inputs.cut_note``).
    ``kw``: ``tta_axes``, ``mesh`` (``network_probs``)."""
    source = np.asarray(image, np.float32)
    if pre.voxel_mm is not None:
        source, grid_affine = resampled(image, affine, pre.voxel_mm, 1)
        if mask is not None:
            mask = resampled(mask, affine, pre.voxel_mm, 0)[0] > 0.5
    x, geom, _ = prepare(source, mask, pre, norm_volumes)
    note = cut_note(geom, pre)
    if note and warn is not None:
        warn(note)
    full = geom.to_source(network_probs(params, config, x, **kw), 0.0)
    full[..., 0] += full.sum(-1) == 0  # outside the network grid: background
    if pre.voxel_mm is not None:
        full = _probs_back(full, grid_affine, np.shape(image), affine)
    return full


class Model(NamedTuple):
    """One network of a prediction: parameters, the ModelConfig to compute with, the ``Preprocessing``
    its inputs get, and voxelwise mean/std volumes (or None)."""

    params: dict
    config: ModelConfig
    pre: Preprocessing
    norm_volumes: dict | None = None

    @classmethod
    def of(cls, ckpt, config: ModelConfig | None = None) -> Model:
        """The checkpoint's network with its recorded preprocessing (``config``: e.g. bfloat16)."""
        return cls(ckpt.params, config or ckpt.config, of_checkpoint(ckpt), ckpt.norm_volumes)


def ensemble(models, image: np.ndarray, affine, mask: np.ndarray | None = None, **kw) -> np.ndarray:
    """Probabilities (D, H, W, C) of a raw ``image`` (D, H, W): the mean of ``predict_volume`` over
    ``models`` (``Model``; e.g. a cross-validation's fold models, as nnU-Net ensembles its folds). Each
    prepares the input its own recorded way; ``mask`` goes to those trained on masked inputs. An ensemble
    of one is that model. ``kw``: ``warn``, ``tta_axes``, ``mesh`` (``predict_volume``)."""
    total = None
    for m in models:
        p = predict_volume(
            m.params, m.config, m.pre, image, affine, mask if m.pre.needs_mask else None, m.norm_volumes, **kw
        )
        total = p if total is None else total + p
    return total / len(models)


def labels_from(probs: np.ndarray) -> np.ndarray:
    """Argmax labels (D, H, W) uint8 of probabilities (D, H, W, C)."""
    return np.argmax(probs, axis=-1).astype(np.uint8)


def mirror_axes(spec: str, affine: np.ndarray) -> tuple[int, ...]:
    """Voxel axes to mirror for test-time augmentation: "lr" = the voxel axis closest to the world's
    left-right axis (from ``affine``: brains are nearly left-right symmetric, so a mirrored brain is
    still a plausible brain), "all" = 0, 1, 2, "none" = (), or a comma list of voxel axes such as "0,2"."""
    if spec == "none":
        return ()
    if spec == "lr":
        return (nifti.lr_axis(affine),)
    if spec == "all":
        return (0, 1, 2)
    bad = f"mirror axes must be none, lr, all or a comma list of 0, 1, 2, not {spec!r}"
    try:
        axes = tuple(sorted({int(a) for a in spec.split(",")}))
    except ValueError:
        raise ValueError(bad) from None
    if not axes or any(a not in (0, 1, 2) for a in axes):
        raise ValueError(bad)
    return axes
