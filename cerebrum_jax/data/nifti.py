"""Volume input with validation (NIfTI-1/2, their .hdr/.img pairs, FreeSurfer MGH/MGZ: every 3-D format
nibabel reads, through one loader) and NIfTI output, written atomically (``fsafe.atomic_path``)."""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
from pathlib import Path

import nibabel as nib
import numpy as np

from cerebrum_jax.errors import InputError, first_line
from cerebrum_jax.fsafe import atomic_path

# the image types of nibabel read as volumes: NIfTI-1 and -2 in one file or as a .hdr/.img pair, and
# FreeSurfer's MGH (.mgh, .mgz gzipped)
READABLE = (nib.Nifti1Image, nib.Nifti2Image, nib.Nifti1Pair, nib.Nifti2Pair, nib.MGHImage)
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".mgz", ".mgh", ".img", ".hdr", ".img.gz", ".hdr.gz")


def is_volume_name(name: str | os.PathLike) -> bool:
    """Whether ``name`` ends like a volume this loader reads (``VOLUME_SUFFIXES``, any case)."""
    return str(name).lower().endswith(VOLUME_SUFFIXES)


def volume_stem(name: str) -> str:
    """``name`` without its volume suffix: ``brain.mgz`` -> ``brain``, ``x_T1w.nii.gz`` -> ``x_T1w``."""
    for suffix in VOLUME_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def volume_files(folder: str | os.PathLike, stem: str = "*") -> list[Path]:
    """The volumes in ``folder`` whose name without its volume suffix matches ``stem`` (a glob pattern,
    e.g. ``*_T1w``), sorted; a .hdr/.img pair once, by its .img."""
    found = [
        p
        for p in sorted(Path(folder).glob(stem + ".*"))
        if is_volume_name(p.name) and fnmatch.fnmatchcase(volume_stem(p.name), stem)
    ]
    images = {volume_stem(p.name) for p in found if p.name.lower().endswith((".img", ".img.gz"))}
    return [
        p
        for p in found
        if not (p.name.lower().endswith((".hdr", ".hdr.gz")) and volume_stem(p.name) in images)
    ]


def as_nifti1(img, path, what: str = "image") -> nib.Nifti1Image:
    """``img`` (NIfTI-2, a NIfTI pair, MGH/MGZ) as a single-file NIfTI-1 image: the same voxels (the data
    proxy, not read yet), affine, data type and voxel sizes; InputError naming ``path`` when its header
    does not convert (a dimension beyond NIfTI-1's 32767)."""
    try:
        with _nibabel_notes():  # 'sizeof_hdr should be 348; set sizeof_hdr to 348' (a NIfTI-2 header's)
            return nib.Nifti1Image.from_image(img)
    except Exception as e:
        raise InputError(
            f"{what} header does not convert to NIfTI-1 ({type(e).__name__}: {first_line(e)})", path
        ) from None


def load_nifti(path: str | os.PathLike, *, what: str = "image", allow_nonfinite: bool = False):
    """Read a 3-D volume (NIfTI-1/2, a .hdr/.img pair, MGH/MGZ): returns (data as float32 (X, Y, Z), the
    image as a NIfTI-1 nibabel image with its affine and header).

    A 4-D image whose 4th axis has length 1 is squeezed to 3-D. Raises InputError naming ``path``
    for a missing, unreadable or non-NIfTI file, a 2-D or 4-D volume, a singular or non-finite affine
    or zero voxel sizes (``check_geometry``), non-numeric data, NaN/inf voxels, or values beyond the
    float32 range.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{what} file does not exist", path)
    if path.is_dir():
        raise InputError(f"{what} is a directory, not a NIfTI file", path)
    try:
        with _nibabel_notes() as notes:  # its header fixes, said here (or not at all), not on stderr
            img = nib.load(str(path))
    except Exception as e:  # nibabel raises many types for foreign or truncated files
        raise InputError(f"not a readable NIfTI file ({type(e).__name__}: {first_line(e)})", path) from None
    if not isinstance(img, READABLE):
        kinds = "NIfTI-1/2 (.nii, .nii.gz, .hdr/.img) or MGH/MGZ"
        raise InputError(
            f"not a volume format read here ({kinds}; nibabel read it as {type(img).__name__})", path
        )
    if type(img) is not nib.Nifti1Image:  # one header type downstream (NIfTI-2 is a subclass): NIfTI-1 out
        img = as_nifti1(img, path, what)
    unplaced = int(img.header["qform_code"]) == 0 and int(img.header["sform_code"]) == 0
    if unplaced and any("pixdim[1,2,3]" in n for n in notes):  # nibabel set the 0 sizes to 1 mm
        raise InputError(
            f"{what} voxel sizes (pixdim) are 0 and there is no qform/sform: its voxel size is unknown "
            "(not taken as 1 mm); fix the header",
            path,
        )
    check_geometry(img, path, what)
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise InputError(f"{what} must be a 3-D volume, got shape {img.shape}", path)
    try:
        data = np.asarray(img.dataobj)
    except Exception as e:
        raise InputError(f"cannot read voxel data ({type(e).__name__}: {first_line(e)})", path) from None
    if not (np.issubdtype(data.dtype, np.number) or data.dtype == np.bool_) or np.iscomplexobj(data):
        raise InputError(f"{what} data of type {data.dtype} cannot be read as real numbers", path)
    data = data.reshape(shape)
    if not allow_nonfinite:
        bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
        if bad:
            raise InputError(f"{what} contains {bad} NaN or infinite voxels", path)
        limit = float(np.finfo(np.float32).max)
        if np.issubdtype(data.dtype, np.floating) and data.dtype.itemsize > 4 and data.size:
            peak = float(np.max(np.abs(data)))
            if peak > limit:
                raise InputError(
                    f"{what} values exceed the float32 range (largest magnitude {peak:.3g} > {limit:.3g}); "
                    "rescale the image",
                    path,
                )
    with np.errstate(over="ignore", invalid="ignore"):  # only reached out of range with allow_nonfinite
        data = data.astype(np.float32)
    return data, img


def check_geometry(img, path, what: str = "image") -> None:
    """InputError naming ``path`` unless the voxel-to-world affine is finite and invertible and the voxel
    sizes of the header (pixdim, used for distances in mm) are finite and non-zero."""
    affine = np.asarray(img.affine, np.float64)
    if not np.isfinite(affine).all():
        raise InputError(f"{what} affine (voxel-to-world matrix) holds NaN or infinite values", path)
    det = float(np.linalg.det(affine[:3, :3]))
    if not abs(det) > 1e-12:
        raise InputError(
            f"{what} affine (voxel-to-world matrix) is singular (determinant {det:.3g}): its voxels have "
            "no size or orientation; fix the header (sform/qform)",
            path,
        )
    zooms = np.asarray(img.header.get_zooms()[:3], np.float64)
    if not (np.isfinite(zooms).all() and (zooms != 0).all()):
        raise InputError(f"{what} voxel sizes (pixdim) {tuple(zooms.tolist())} must be finite, not 0", path)


def lr_axis(affine) -> int:
    """The voxel axis nearest the world's left-right axis in a voxel-to-mm ``affine`` (4, 4): the one
    with the largest x component (nibabel's RAS+ world). Brains are nearly left-right symmetric: the
    axis mirroring (training views, test-time augmentation) may use."""
    return int(np.argmax(np.abs(np.asarray(affine)[0, :3])))


AFFINE_TOL_MM = 1e-3  # largest accepted difference of any entry of two voxel-to-mm affines on one grid


def check_same_grid(path_a, img_a, path_b, img_b, shape_a=None, shape_b=None, name_a=None) -> None:
    """InputError naming ``path_b`` unless its grid is ``path_a``'s: the same shape (default: the images'
    first three axes), voxel size and voxel-to-mm affine (within ``AFFINE_TOL_MM``). name_a: how the
    message names ``path_a`` (default: its path; e.g. "the reference")."""
    ref = name_a or str(path_a)
    shape_a = tuple(img_a.shape[:3] if shape_a is None else shape_a)
    shape_b = tuple(img_b.shape[:3] if shape_b is None else shape_b)
    if shape_a != shape_b:
        raise InputError(f"shape {shape_b} differs from {shape_a} of {ref}", path_b)
    zooms_a, zooms_b = (tuple(float(z) for z in img.header.get_zooms()[:3]) for img in (img_a, img_b))
    if not np.allclose(zooms_a, zooms_b, rtol=1e-3):
        raise InputError(f"voxel size {zooms_b} differs from {zooms_a} of {ref}", path_b)
    worst = float(np.abs(np.asarray(img_a.affine, float) - np.asarray(img_b.affine, float)).max())
    if not worst <= AFFINE_TOL_MM:
        raise InputError(
            f"affine (orientation/origin) differs from that of {ref} by up to {worst:.4g} mm (tolerance "
            f"{AFFINE_TOL_MM} mm): the voxels do not lie at the same places; resample it first",
            path_b,
        )


@contextlib.contextmanager
def _nibabel_notes():
    """Collect the messages nibabel logs while reading a header (its 'nibabel.global' logger prints them
    on stderr: 'pixdim[1,2,3] should be non-zero; setting 0 dims to 1', 'data code 999 not
    recognized'), so that a bad file ends in the tool's one line. Yields the list of messages."""
    logger, notes = logging.getLogger("nibabel.global"), []

    class Collect(logging.Handler):
        def emit(self, record):
            notes.append(record.getMessage())

    handlers, propagate = logger.handlers[:], logger.propagate
    logger.handlers, logger.propagate = [Collect()], False
    try:
        yield notes
    finally:
        logger.handlers, logger.propagate = handlers, propagate


def save_nifti(path, data: np.ndarray, like: nib.Nifti1Image | None = None, affine=None, dtype=None) -> Path:
    """Write ``data`` as NIfTI atomically, keeping the affine and header of ``like`` when given.

    ``dtype`` (e.g. np.uint8 for labels, np.float32 for probabilities) sets both the array and
    the header data type, with scaling reset so the stored values are exact.
    """
    data = np.asarray(data if dtype is None else np.asarray(data).astype(dtype))
    if like is not None:
        header = like.header.copy()
        affine = like.affine if affine is None else affine
        img = nib.Nifti1Image(data, affine, header)
        img.set_qform(like.get_qform(), code=int(like.header["qform_code"]))
        img.set_sform(like.get_sform(), code=int(like.header["sform_code"]))
    else:
        img = nib.Nifti1Image(data, np.eye(4) if affine is None else affine)
    img.set_data_dtype(data.dtype)
    img.header.set_slope_inter(1.0, 0.0)
    if data.ndim == 4:
        img.header.set_intent("vector")
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return Path(path)
