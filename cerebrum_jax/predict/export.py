"""The one writer of predictions, apart from the prediction math (``predictor``): the dseg and probseg
NIfTI files and their BIDS sidecars, for ``segment`` and a fold's test subject alike."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cerebrum_jax.data import bids, nifti
from cerebrum_jax.predict.predictor import labels_from


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
