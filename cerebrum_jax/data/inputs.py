"""How a volume becomes a network input, the same way in training and in prediction.

A fine-tuned checkpoint records how its training volumes were prepared (``Preprocessing``, saved in its
cerebrum.json): brain mask or none, crop rule, margin, network grid, voxel size and normalisation.
``prepare`` applies the record to any raw volume (``predictor`` for ``segment`` and a fold's test
subject), and ``load_subject`` applies it to a training subject with its labels, so training and test
inputs are always of one kind. No step here ever reads a subject's labels unless the record says
mask "labels" (the original paper's protocol).

Volumes are (D, H, W) numpy arrays in the voxel order of their NIfTI file (scanner units, mm grids);
the network grid (D', H', W') has multiples of 8.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import nibabel as nib
import numpy as np
from scipy import ndimage

from cerebrum_jax.choices import CROPS, MASKS, NORMALIZATIONS
from cerebrum_jax.data import nifti, preprocess
from cerebrum_jax.data.nifti import load_nifti
from cerebrum_jax.errors import InputError
from cerebrum_jax.model.spec import DIVISOR


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How a checkpoint's inputs were prepared; ``prepare`` applies it to any volume.

    mask: "none" (the image as it is), "file" (a brain-mask file; voxels outside it are set to 0) or
      "labels" (the mask was the manual labels > 0: the original paper's protocol; a new subject then
      needs a mask file of its own).
    crop: "box" (cut to the box of the mask, or of the head foreground (``foreground``) when there is no
      mask, plus ``margin`` voxels per side, then centred on ``grid``) or "none" (the whole volume,
      centred on ``grid``).
    grid: the network grid (D, H, W), multiples of 8; None = the (cropped) volume's shape rounded up to 8.
    voxel_mm: resample to this voxel size (mm) first, and the probabilities back afterwards; None = keep.
    normalization: "zscore" (statistics inside the mask; else inside the foreground when cropping to a
      box; else of the whole volume), "voxelwise" (the checkpoint's mean/std volumes, on ``grid``) or
      "none".
    """

    mask: str = "none"
    crop: str = "none"
    margin: int = 4
    grid: tuple[int, int, int] | None = None
    voxel_mm: float | None = None
    normalization: str = "zscore"

    def __post_init__(self):
        if self.mask not in MASKS or self.crop not in CROPS or self.normalization not in NORMALIZATIONS:
            raise ValueError(f"unknown preprocessing {dataclasses.asdict(self)}")
        if self.grid is not None:
            object.__setattr__(self, "grid", tuple(int(g) for g in self.grid))

    @property
    def needs_mask(self) -> bool:
        return self.mask != "none"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["grid"] = None if self.grid is None else list(self.grid)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def describe(self) -> str:
        mask = {"none": "no brain mask", "file": "brain-mask file", "labels": "mask from the manual labels"}
        crop = f"cropped to the box + {self.margin} voxels" if self.crop == "box" else "whole volume"
        grid = "x".join(map(str, self.grid)) if self.grid else "auto"
        voxel = f", resampled to {self.voxel_mm} mm" if self.voxel_mm else ""
        return f"{mask[self.mask]}, {crop}, grid {grid}{voxel}, {self.normalization} normalisation"


def of_checkpoint(ckpt) -> Preprocessing:
    """The checkpoint's recorded Preprocessing; for one without a record (converted from Keras, or older):
    the whole volume, no mask, its normalisation (voxelwise on the mean/std volumes' grid)."""
    record = ckpt.meta.get("preprocessing")
    if record:
        return Preprocessing.from_dict(record)
    grid = np.shape(ckpt.norm_volumes["mean"]) if ckpt.normalization == "voxelwise" else None
    return Preprocessing(normalization=ckpt.normalization, grid=grid)


# ----------------------------------------------------------------------------------------------------------
# Geometry: the pure operations, on one (D, H, W) volume


def foreground(image: np.ndarray) -> np.ndarray:
    """Head (or brain) foreground (D, H, W) bool from intensities alone, never from labels.

    Voxels above 10 % of the 99th percentile, opened once (drops isolated noise voxels), the largest
    connected component, holes filled. Used to crop unmasked volumes to a box and for their z-score.
    """
    image = np.asarray(image, np.float64)
    low = float(np.min(image))
    level = low + 0.1 * (float(np.percentile(image, 99)) - low)
    fg = ndimage.binary_opening(image > level)
    if not fg.any():
        return np.ones(image.shape, bool)
    parts, n = ndimage.label(fg)
    if n > 1:
        sizes = ndimage.sum_labels(fg, parts, index=np.arange(1, n + 1))
        fg = parts == 1 + int(np.argmax(sizes))
    return ndimage.binary_fill_holes(fg)


class Geometry(NamedTuple):
    """Where a network input lies on its source grid: the crop box, then ``pad_or_crop`` to the grid;
    ``head``: the box of the head (or brain) itself, without margin (None: the crop box)."""

    box: preprocess.Box
    padcrop: preprocess.PadCrop
    head: preprocess.Box | None = None

    def to_grid(self, volume: np.ndarray, value=0) -> np.ndarray:
        """A (D, H, W[, C]) source-grid volume cut and padded onto the network grid."""
        return preprocess.pad_or_crop(preprocess.crop(volume, self.box), self.grid, value=value)[0]

    @property
    def grid(self) -> tuple[int, ...]:
        return tuple(int(b0 + s + b1) for (b0, b1), s in zip(self.padcrop.pads, self._cropped, strict=True))

    @property
    def _cropped(self) -> tuple[int, ...]:
        return tuple(b - a for a, b in self.padcrop.crops)

    def to_source(self, volume: np.ndarray, fill=0) -> np.ndarray:
        """Inverse of ``to_grid``: a network-grid volume back on the source grid, ``fill`` elsewhere."""
        return preprocess.uncrop(preprocess.undo_pad_or_crop(volume, self.padcrop, fill), self.box, fill)

    def affine(self, source_affine: np.ndarray) -> np.ndarray:
        """The affine (4, 4) of the network grid, given the source grid's."""
        offset = tuple(
            b + o for b, o in zip(self.box.starts, preprocess.pad_crop_offset(self.padcrop), strict=True)
        )
        return preprocess.shift_affine(source_affine, offset)


def plan(image: np.ndarray, mask: np.ndarray | None, pre: Preprocessing) -> tuple[Geometry, np.ndarray]:
    """(Geometry, statistics region (D, H, W) bool on the source grid) of a source-grid ``image``.

    The region is the mask when there is one, else the foreground for a "box" crop, else every voxel.
    """
    if mask is not None:
        region = np.asarray(mask, bool)
    elif pre.crop == "box":
        region = foreground(image)
    else:
        region = np.ones(image.shape, bool)
    if pre.crop == "box":
        head = preprocess.bounding_box(region)
        box = head.grown(pre.margin)
    else:
        head, box = None, preprocess.Box((0, 0, 0), tuple(image.shape), tuple(image.shape))
    grid = pre.grid if pre.grid is not None else preprocess.grid_for(box.shape)
    _, info = preprocess.pad_or_crop(np.zeros(box.shape, bool), grid)
    return Geometry(box, info, head), region


def cut_note(geom: Geometry, pre: Preprocessing) -> str | None:
    """A warning, or None, when centring on the network grid cut into the head (or brain) itself
    (``geom.head``; the whole volume without a "box" crop): that part gets no labels (background).
    Cutting into the crop's margin only is silent.

    It happens when a model with a fixed grid meets a larger head than it was trained on, or one at a
    finer voxel size (a 1 mm head for a model trained at 3 mm without ``voxel_mm``)."""
    box, head = geom.box, geom.head or geom.box
    lost = [
        max(0, box.starts[a] + c0 - head.starts[a]) + max(0, head.stops[a] - box.starts[a] - c1)
        for a, (c0, c1) in enumerate(geom.padcrop.crops)
    ]
    if not any(lost):
        return None
    what = ("brain" if pre.needs_mask else "head") if pre.crop == "box" else "volume"
    grid, shape = "x".join(map(str, geom.grid)), "x".join(map(str, head.shape))
    return (
        f"the {what} ({shape} voxels) is larger than the model's grid {grid}: {'/'.join(map(str, lost))} "
        "voxel rows of it (D/H/W) fall outside the grid and are labelled background (is the voxel size the "
        "one the model was trained at?)"
    )


def voxel_size(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size (mm) per axis of a (4, 4) affine: the lengths of its first three columns."""
    return tuple(float(z) for z in np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0)))


def spacing_note(trained_mm, spacing_mm, pre: Preprocessing, tolerance: float = 0.25) -> str | None:
    """A warning, or None, when an input's voxel size ``spacing_mm`` (3,) differs by more than
    ``tolerance`` (relative, any axis) from ``trained_mm`` (3,), the voxel size of the data a checkpoint
    was fine-tuned on (its meta "train_voxel_mm"; None: not recorded). A model that resamples its inputs
    (``pre.voxel_mm``) sees its own voxel size whatever the input's."""
    if trained_mm is None or pre.voxel_mm is not None:
        return None
    ratio = np.asarray(spacing_mm, float) / np.asarray(trained_mm, float)
    if np.all(np.abs(ratio - 1.0) <= tolerance):
        return None
    shown = lambda v: "x".join(f"{z:.2g}" for z in v)  # noqa: E731
    return (
        f"voxel size {shown(spacing_mm)} mm, but the model was fine-tuned on {shown(trained_mm)} mm voxels "
        "and does not resample: resample the volume to that voxel size first (anatomy at another scale "
        "is an input it never saw)"
    )


def prepare(
    image: np.ndarray, mask: np.ndarray | None, pre: Preprocessing, norm_volumes: dict | None = None
) -> tuple[np.ndarray, Geometry, np.ndarray]:
    """(network input x (D', H', W') float32, Geometry, statistics region on the grid (D', H', W') bool).

    ``image`` (D, H, W) in scanner units on the (resampled) source grid; ``mask`` (D, H, W) bool or None
    (applied: the image is 0 outside it). Normalised as ``pre.normalization`` says; voxelwise needs
    ``norm_volumes`` {"mean", "std"} on ``pre.grid``.
    """
    image = np.asarray(image, np.float32)
    if mask is not None and np.shape(mask) != image.shape:
        raise ValueError(f"mask shape {np.shape(mask)} differs from image shape {image.shape}")
    geom, region = plan(image, mask, pre)
    if mask is not None:
        image = np.where(mask, image, 0.0).astype(np.float32)
    x = geom.to_grid(image, 0.0)
    region = geom.to_grid(region, False)
    if pre.normalization == "zscore":
        x = preprocess.zscore(x, region)
    elif pre.normalization == "voxelwise":
        if norm_volumes is None:
            raise ValueError("voxelwise normalization needs norm_volumes={'mean', 'std'}")
        x = preprocess.voxelwise_zscore(x, norm_volumes["mean"], norm_volumes["std"])
    return x.astype(np.float32), geom, region


# ----------------------------------------------------------------------------------------------------------
# A subject with labels, for training and evaluation


def read_mask(path, img, pre: Preprocessing, labels_path=None) -> np.ndarray | None:
    """The brain mask (D, H, W) bool that ``pre.mask`` asks for, on ``img``'s grid: a mask file's voxels > 0.5
    ("file"), a label file's voxels > 0 ("labels"), or None ("none"). InputError naming the file when it
    is missing or on another grid."""
    if pre.mask == "none":
        return None
    source = path if pre.mask == "file" else labels_path
    if source is None:
        raise InputError(f"the preprocessing needs a brain mask ({pre.mask}) and none was given", "mask")
    data, mimg = load_nifti(source, what="mask")
    nifti.check_same_grid(img.get_filename() or "image", img, source, mimg, img.shape[:3], data.shape)
    return data > (0.5 if pre.mask == "file" else 0)


@dataclasses.dataclass(frozen=True, eq=False)
class PreparedSubject:
    """One subject read, checked and prepared for training or evaluation (``load_subject``).

    id; subject (the ``data.Subject``: its files); image (D', H', W') float32 on the network grid, in
    scanner units, 0 outside the mask, not normalised; labels (D', H', W') int32 class indices; mask
    (D', H', W') bool: the z-score statistics region (the brain mask, else the foreground); affine
    (4, 4) of the network grid (mm); spacing (3,) mm; img (the source nibabel image); geometry (the
    ``Geometry`` to undo: network grid -> the possibly resampled source grid); label_map; x: the
    network input (D', H', W') float32, the image normalised for a fold (``fold.load_fold``), None until
    then (``with_input``).
    """

    id: str
    subject: object
    image: np.ndarray
    labels: np.ndarray
    mask: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    img: object
    geometry: Geometry
    label_map: object
    x: np.ndarray | None = None

    def with_input(self, x: np.ndarray) -> PreparedSubject:
        """A copy with the normalised network input ``x``."""
        return dataclasses.replace(self, x=x)


def load_subject(subject, label_map, pre: Preprocessing) -> PreparedSubject:
    """Read, validate and prepare one ``data.Subject`` with its labels, as ``pre`` says.

    Steps: load image and labels (InputError naming both files if their shapes or affines differ);
    optionally resample both (and a mask file) to ``pre.voxel_mm`` (order 1 image, 0 labels and mask);
    map labels with ``label_map`` (InputError for values outside it); the brain mask ``pre.mask`` asks
    for (``read_mask``); ``prepare`` without normalisation (a fold normalises its subjects together,
    from its training subjects); labels cut and padded the same way.
    """
    image, img = load_nifti(subject.image, what="image")
    labels, limg = load_nifti(subject.labels, what="labels")
    nifti.check_same_grid(subject.image, img, subject.labels, limg, image.shape, labels.shape)
    mask = read_mask(subject.mask, img, pre, subject.labels)
    affine = np.array(img.affine, np.float64)
    if pre.voxel_mm is not None:
        image, new = resampled(image, affine, pre.voxel_mm, 1)
        labels, _ = resampled(labels, affine, pre.voxel_mm, 0)
        mask = None if mask is None else resampled(mask, affine, pre.voxel_mm, 0)[0] > 0.5
        affine = new
    classes = label_map.apply(labels, subject.labels)
    if pre.grid is not None and (len(pre.grid) != 3 or any(g <= 0 or g % DIVISOR for g in pre.grid)):
        raise InputError(f"grid {pre.grid} must be 3 positive multiples of {DIVISOR}", "--grid")
    x, geom, region = prepare(image, mask, dataclasses.replace(pre, normalization="none"))
    return PreparedSubject(
        id=subject.id,
        subject=subject,
        image=x,
        labels=geom.to_grid(classes, 0).astype(np.int32),
        mask=region,
        affine=geom.affine(affine),
        spacing=voxel_size(affine),
        img=img,
        geometry=geom,
        label_map=label_map,
    )


def resampled(data: np.ndarray, affine: np.ndarray, voxel_mm, order: int):
    """(data resampled to ``voxel_mm`` with ``preprocess.resample``, the new nibabel image's affine)."""
    out = preprocess.resample(nib.Nifti1Image(np.asarray(data, np.float32), affine), voxel_mm, order)
    return np.asarray(out.dataobj, np.float32), np.array(out.affine, np.float64)
