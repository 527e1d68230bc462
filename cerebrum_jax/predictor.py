"""One prediction path for ``segment`` and a fold's test subject: raw volume -> prepared input
(``inputs.prepare``, the checkpoint's recorded ``Preprocessing``) -> network (mirrored copies averaged
for test-time augmentation; several checkpoints averaged as an ensemble) -> probabilities on the
input's own grid -> the files ``write_segmentation`` writes. nnU-Net's fold validation and predict
command share one predictor in the same way, so what a fold measures is what a user gets.

Probabilities are (D, H, W, C) float32 on the input grid; voxels outside the network's grid are
background (probability 1 for class 0).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import jax
import nibabel as nib
import numpy as np
from nibabel import processing

from cerebrum_jax import bids, lean, model, nifti
from cerebrum_jax.inputs import Preprocessing, cut_note, of_checkpoint, prepare, resampled
from cerebrum_jax.model import ModelConfig

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


@functools.lru_cache(maxsize=8)
def forward_fn(config: ModelConfig) -> Callable:
    """Jit-compiled ``(params, x (1, D, H, W, 1)) -> probabilities (1, D, H, W, n_classes)`` of ``config``.

    On a CPU backend it is ``lean.probabilities_lean`` (depth slabs at full resolution: a 256x352x224
    volume within 3 GB instead of 11 GB, and about 3x faster at any size, as XLA:CPU's 2-D convolutions
    beat its 3-D ones); elsewhere ``model.probabilities``. The two agree to float rounding. Cached per
    (hashable, frozen) config so repeated calls on volumes of the same shape reuse one compilation.
    """

    def forward(params, x):
        if jax.default_backend() == "cpu":
            return lean.probabilities_lean(params, config, x)
        return model.probabilities(params, config, x)

    return jax.jit(forward)


def network_probs(params, config: ModelConfig, x: np.ndarray, *, tta_axes=(), mesh=None) -> np.ndarray:
    """Softmax probabilities (D, H, W, C) float32 of one prepared input x (D, H, W), averaged over the
    mirrored copies of ``tta_axes`` (``mirror_sets``) when given. ``mesh``: split the forward along depth
    over its devices (``sharding.sharded_forward``); None: one device."""
    total = None
    flips = mirror_sets(tta_axes)
    for axes in flips:
        xin = np.ascontiguousarray(flip(x, axes))[None, ..., None]
        if mesh is None:
            p = forward_fn(config)(params, xin)
        else:
            from cerebrum_jax import distributed, sharding

            # across processes (--distributed) the sharded result is gathered: every caller writes it
            p = distributed.gather(sharding.sharded_forward(params, config, xin, mesh))
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
    still a plausible brain), "all" = 0, 1, 2, or a comma list of voxel axes such as "0,2"."""
    if spec == "lr":
        return (int(np.argmax(np.abs(np.asarray(affine)[0, :3]))),)
    if spec == "all":
        return (0, 1, 2)
    try:
        axes = tuple(sorted({int(a) for a in spec.split(",")}))
    except ValueError:
        raise ValueError(f"mirror axes must be lr, all or a comma list of 0, 1, 2, not {spec!r}") from None
    if not axes or any(a not in (0, 1, 2) for a in axes):
        raise ValueError(f"mirror axes must be lr, all or a comma list of 0, 1, 2, not {spec!r}")
    return axes


def output_paths(out, prefix: str, probseg: bool = True) -> list:
    """[probseg path (when ``probseg``), dseg path] that ``write_segmentation`` writes for ``prefix``
    (``bids.derivative_prefix`` of the input, e.g. sub-019_space-orig)."""
    prefix = Path(out) / f"{prefix}_desc-cerebrum"
    return [Path(f"{prefix}_probseg.nii.gz")] * probseg + [Path(f"{prefix}_dseg.nii.gz")]


def write_segmentation(out, prefix: str, probs: np.ndarray, like, *, probseg: bool = True, sidecar=None):
    """The one writer of predictions (``segment`` and a fold's test subject):
    OUT/<prefix>_desc-cerebrum_dseg.nii.gz (uint8 argmax labels) and, with ``probseg``, ..._probseg.nii.gz
    (float32, classes on the 4th axis), with the header and affine of ``like`` (the input's nibabel
    image), each written to a temporary name and renamed; with ``sidecar`` (the keyword arguments of
    ``bids.seg_sidecar`` but ``kind``), the BIDS JSON sidecar of each. Returns the dseg path."""
    paths = output_paths(out, prefix, probseg)
    if probseg:
        nifti.save_nifti(paths[0], probs, like=like, dtype=np.float32)
    dseg = nifti.save_nifti(paths[-1], labels_from(probs), like=like, dtype=np.uint8)
    if sidecar is not None:
        spacing = [float(z) for z in like.header.get_zooms()[:3]]
        for path, kind in zip(paths, ("probseg", "dseg")[-len(paths) :], strict=True):
            bids.write_sidecar(path, bids.seg_sidecar(kind=kind, spacing_mm=spacing, **sidecar))
    return dseg
