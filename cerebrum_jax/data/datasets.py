"""Datasets: subjects and their files, and folds (label maps live in ``labels``).

Nothing here loads voxel data; ``inputs.load_subject`` reads a subject's files when they are needed.

Two on-disk layouts are read (``find_subjects``):

- ``schneider``: the Zenodo record of Schneider, Gulban & Goebel (2019),
  ``derivatives/sub-XXX/unbiased/sub-XXX_<contrast>_unbiased.nii.gz`` with labels
  ``derivatives/sub-XXX/labeled/sub-XXX_labels_v01.nii.gz`` (the offline demo cohort uses it too);
- ``bids``: ``sub-*/anat/*_T1w.nii.gz`` with labels ``sub-*/seg/*_<seg_name>.nii.gz`` and an optional
  brain mask ``sub-*/seg/*_<mask_name>.nii.gz``.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cerebrum_jax.data import nifti
from cerebrum_jax.data.bids import find_dataset_root, read_description
from cerebrum_jax.errors import InputError

CONTRASTS = ("uni", "inv1", "inv2", "t1", "t2s")
LAYOUTS = ("auto", "schneider", "bids")


@dataclass(frozen=True)
class Subject:
    """One subject's files: image, labels and an optional brain mask (paths only; nothing is read)."""

    id: str
    image: Path
    labels: Path
    mask: Path | None = None


# ----------------------------------------------------------------------------------------------------------
# Readers


def find_subjects(
    root: str | os.PathLike,
    layout: str = "auto",
    contrast: str = "uni",
    seg_name: str = "dseg",
    mask_name: str | None = None,
) -> list[Subject]:
    """All subjects under ``root``, sorted by id; only paths are checked (no voxel data is read).

    ``layout``: "schneider", "bids" or "auto" (schneider when ``root`` or ``root/derivatives`` holds
    ``sub-*/unbiased``, else bids). ``contrast`` picks the Schneider image (uni, inv1, inv2, t1, t2s);
    ``seg_name`` / ``mask_name`` the BIDS label and mask files. Raises InputError for a missing root, an
    unknown layout or contrast, a subject with a missing file, or fewer than 2 subjects.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError("data directory does not exist", root)
    read_description(find_dataset_root(root))  # its SourceDatasets entry at the end: refuse it now
    if layout not in LAYOUTS:
        raise InputError(f"unknown layout {layout!r}; use one of {', '.join(LAYOUTS)}", root)
    base = _schneider_base(root)
    if layout == "schneider" or (layout == "auto" and base is not None):
        subjects = _schneider_subjects(base or root, contrast)
    elif layout == "bids" or any(root.glob("sub-*/anat")):
        subjects = _bids_subjects(root, seg_name, mask_name)
    else:
        raise InputError("no subjects found (neither derivatives/sub-*/unbiased nor sub-*/anat)", root)
    if len(subjects) < 2:
        raise InputError(f"found {len(subjects)} subject(s); at least 2 are needed (train and test)", root)
    return sorted(subjects, key=lambda s: s.id)


def _schneider_base(root: Path) -> Path | None:
    for base in (root / "derivatives", root):
        if any(base.glob("sub-*/unbiased")):
            return base
    return None


def _schneider_subjects(base: Path, contrast: str) -> list[Subject]:
    if contrast not in CONTRASTS:
        raise InputError(f"unknown contrast {contrast!r}; use one of {', '.join(CONTRASTS)}", "--contrast")
    subjects = []
    for folder in sorted(p for p in base.glob("sub-*") if p.is_dir()):
        sid = folder.name
        image = folder / "unbiased" / f"{sid}_{contrast}_unbiased.nii.gz"
        labels = folder / "labeled" / f"{sid}_labels_v01.nii.gz"
        for path, what in ((image, f"{contrast} image"), (labels, "label file")):
            if not path.is_file():
                raise InputError(f"{what} of {sid} is missing", path)
        subjects.append(Subject(sid, image, labels))
    return subjects


def _bids_subjects(root: Path, seg_name: str, mask_name: str | None) -> list[Subject]:
    subjects = []
    for folder in sorted(p for p in root.glob("sub-*") if p.is_dir()):
        sid = folder.name
        image = _one(folder / "anat", "*_T1w.nii.gz", f"T1w image of {sid}")
        labels = _one(folder / "seg", f"*_{seg_name}.nii.gz", f"{seg_name} label file of {sid}")
        mask = None
        if mask_name:
            mask = _one(folder / "seg", f"*_{mask_name}.nii.gz", f"{mask_name} mask of {sid}")
        subjects.append(Subject(sid, image, labels, mask))
    return subjects


def _one(folder: Path, pattern: str, what: str) -> Path:
    """The one volume in ``folder`` whose name is ``pattern`` (``*_T1w.nii.gz``) with any suffix the
    loader reads (``nifti.VOLUME_SUFFIXES``: .nii, .mgz, a .hdr/.img pair counted once)."""
    found = nifti.volume_files(folder, nifti.volume_stem(pattern))
    if len(found) != 1:
        raise InputError(f"expected exactly one {what} ({pattern}), found {len(found)}", folder)
    return found[0]


# ----------------------------------------------------------------------------------------------------------
# Folds


def split_fold(
    subjects: Sequence[Subject], fold: int, val_subject: str | None = None
) -> tuple[list[Subject], list[Subject], list[Subject]]:
    """Leave-one-out fold ``fold`` (1-based: 1..N) of subjects in sorted-id order -> (train, val, test).

    The test set is subject ``fold``; training is all the others. Validation is the training subjects
    themselves (their un-augmented volumes) by default, or the subject with id ``val_subject``, which is
    then taken out of training. The test subject is never in train or val. Raises InputError for a fold
    out of range, an unknown ``val_subject``, or ``val_subject`` equal to the test subject.
    """
    ordered = sorted(subjects, key=lambda s: s.id)
    n = len(ordered)
    if n < 2:
        raise InputError(f"{n} subject(s); at least 2 are needed for a fold", "--fold")
    if isinstance(fold, bool) or not isinstance(fold, int | np.integer) or not 1 <= fold <= n:
        raise InputError(f"fold {fold!r} is out of range: use 1..{n} for {n} subjects", "--fold")
    test = [ordered[fold - 1]]
    train = [s for s in ordered if s.id != test[0].id]
    if val_subject is None:
        return train, list(train), test
    ids = [s.id for s in ordered]
    if val_subject not in ids:
        raise InputError(f"no subject {val_subject!r}; subjects are {', '.join(ids)}", "--val-subject")
    if val_subject == test[0].id:
        raise InputError(f"{val_subject} is the test subject of fold {fold}", "--val-subject")
    if n < 3:
        raise InputError("holding out a validation subject needs at least 3 subjects", "--val-subject")
    val = [s for s in train if s.id == val_subject]
    return [s for s in train if s.id != val_subject], val, test


@functools.lru_cache(maxsize=256)
def _file_key(path: Path, size: int, mtime_ns: int) -> str:
    """sha256 of a file's bytes (cached by path, size and modification time: every fold asks again)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_identity(path: Path) -> str:
    """What makes two label or image files the same: their content (a symbolic link, a hard link and a
    byte-identical copy are all the same file)."""
    st = Path(path).stat()
    return _file_key(Path(path).resolve(), st.st_size, st.st_mtime_ns)


def check_distinct(subjects: Sequence[Subject]) -> None:
    """InputError unless no two subjects have one image file by content: a link to a subject's image, or a
    copy of it under another subject id, would train on a test subject's own image and labels in some
    fold. Label files alone may be equal: synthetic cohorts draw several images from one label map."""
    seen: dict[str, Subject] = {}
    for s in subjects:
        other = seen.setdefault(file_identity(s.image), s)
        if other is not s:
            raise InputError(
                f"the image of subject {s.id} is the same file (by content) as the image of subject "
                f"{other.id} ({other.image}): a fold would test on an image it trained on; remove the copy",
                s.image,
            )
