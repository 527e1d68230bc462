"""Datasets: subjects and their files, label maps (source label values -> class indices) and folds.

Nothing here loads voxel data except ``LabelMap.apply``, which maps an already loaded label volume;
``preprocess.load_subject`` reads a subject's files when they are needed.

Two on-disk layouts are read (``find_subjects``):

- ``schneider``: the Zenodo record of Schneider, Gulban & Goebel (2019),
  ``derivatives/sub-XXX/unbiased/sub-XXX_<contrast>_unbiased.nii.gz`` with labels
  ``derivatives/sub-XXX/labeled/sub-XXX_labels_v01.nii.gz`` (the offline demo cohort uses it too);
- ``bids``: ``sub-*/anat/*_T1w.nii.gz`` with labels ``sub-*/seg/*_<seg_name>.nii.gz`` and an optional
  brain mask ``sub-*/seg/*_<mask_name>.nii.gz``.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cerebrum_jax.errors import InputError
from cerebrum_jax.fsafe import read_text, write_text

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
# Label maps


@dataclass(frozen=True)
class LabelMap:
    """Which source label value (as stored in the label files) goes to which class index and name.

    ``names[k]`` is the name of class k (class 0 is the background); ``sources`` holds (source value,
    class index) pairs, sorted by source value. Source value 0 always maps to class 0. A source value
    that is not listed is an error in ``apply`` (use ``drop`` to send a value to the background).
    """

    names: tuple[str, ...]
    sources: tuple[tuple[int, int], ...]

    def __post_init__(self):
        lookup = dict(self.sources)
        if len(lookup) != len(self.sources):
            raise ValueError(f"a source value is listed twice in {self.sources}")
        if lookup.get(0, 0) != 0:
            raise ValueError("source value 0 must map to the background class 0")
        used = set(lookup.values()) | {0}
        if used != set(range(len(self.names))):
            raise ValueError(f"classes {sorted(set(range(len(self.names))) - used)} have no source value")

    @classmethod
    def from_classes(cls, classes: Sequence[tuple[str, Iterable[int]]]) -> LabelMap:
        """Build from [(name, source values)] in class order; class 0 (first) gets source value 0 too."""
        names = tuple(name for name, _ in classes)
        pairs = {0: 0}
        for index, (_, values) in enumerate(classes):
            for v in values:
                pairs[int(v)] = index
        return cls(names, tuple(sorted(pairs.items())))

    @classmethod
    def identity(cls, names: Sequence[str]) -> LabelMap:
        """Source value k -> class k for every k (names[0] is the background)."""
        return cls.from_classes([(n, [k]) for k, n in enumerate(names)])

    @property
    def n_classes(self) -> int:
        return len(self.names)

    def class_sources(self, index: int) -> tuple[int, ...]:
        """The source values that go to class ``index``."""
        return tuple(v for v, k in self.sources if k == index)

    def drop(self, *values: int) -> LabelMap:
        """Send source ``values`` to the background; classes left with no source value disappear."""
        missing = [v for v in values if v not in dict(self.sources)]
        if missing:
            raise InputError(f"cannot drop label value(s) {missing}: not in the label map {self.describe()}")
        keep = [[v for v in self.class_sources(k) if v not in values] for k in range(self.n_classes)]
        groups = list(zip(self.names, keep, strict=True))
        groups[0][1].extend(values)
        return LabelMap.from_classes([g for k, g in enumerate(groups) if k == 0 or g[1]])

    def merge(self, values: Sequence[int], name: str | None = None) -> LabelMap:
        """Put the classes of source ``values`` into one class (at the first one's place), named ``name``."""
        lookup = dict(self.sources)
        missing = [v for v in values if v not in lookup]
        if missing or len(values) < 2:
            known = self.describe()
            raise InputError(f"cannot merge label values {list(values)}: need >= 2 values of {known}")
        targets = sorted({lookup[v] for v in values})
        if targets[0] == 0:
            raise InputError(f"cannot merge label values {list(values)} into the background; use drop")
        merged = name or "+".join(self.names[k] for k in targets)
        groups = []
        for k, n in enumerate(self.names):
            if k == targets[0]:
                groups.append((merged, [v for t in targets for v in self.class_sources(t)]))
            elif k not in targets:
                groups.append((n, list(self.class_sources(k))))
        return LabelMap.from_classes(groups)

    def apply(self, labels: np.ndarray, path: str | os.PathLike | None = None) -> np.ndarray:
        """Map a label volume (any shape, integer-valued) to int32 class indices, same shape.

        Values that are not integers or not in the map raise InputError naming ``path`` and the values.
        """
        labels = np.asarray(labels)
        rounded = np.rint(labels)
        if np.any(rounded != labels):
            raise InputError("label volume holds non-integer values", path)
        values, inverse = np.unique(rounded.astype(np.int64), return_inverse=True)
        lookup = dict(self.sources)
        bad = [int(v) for v in values if int(v) not in lookup]
        if bad:
            shown = ", ".join(map(str, bad[:10])) + (" ..." if len(bad) > 10 else "")
            raise InputError(f"label values {shown} are not in the label map {self.describe()}", path)
        table = np.array([lookup[int(v)] for v in values], np.int32)
        return table[inverse].reshape(labels.shape)

    def describe(self) -> str:
        """One line: 'value->index name' per class, e.g. '{1->1 white matter, 2->2 grey matter}'."""
        return "{" + ", ".join(f"{v}->{k} {self.names[k]}" for v, k in self.sources if v != 0) + "}"

    def to_tsv(self, path: str | os.PathLike | None = None) -> str:
        """dseg.tsv text (header 'index\\tname', a row per class); written atomically when ``path`` given."""
        text = "index\tname\n" + "".join(f"{k}\t{n}\n" for k, n in enumerate(self.names))
        if path is not None:
            write_text(path, text)
        return text

    def to_source_tsv(self) -> str:
        """``to_tsv`` plus a column 'source' (comma-separated source values), as ``from_tsv`` reads."""
        rows = [f"{k}\t{n}\t{','.join(map(str, self.class_sources(k)))}" for k, n in enumerate(self.names)]
        return "index\tname\tsource\n" + "\n".join(rows) + "\n"

    @classmethod
    def from_tsv(cls, path: str | os.PathLike) -> LabelMap:
        """Read a dseg-style TSV: columns index, name and optionally source (comma-separated values).

        Without a source column, source value = index. Indices must be 0..K-1 with 0 the background; a
        table without a row for 0 (as fMRIPrep writes them) gets 0 as the background.
        """
        path = Path(path)
        text = read_text(path, "label table")
        rows = list(csv.DictReader(io.StringIO(text), delimiter="\t"))
        fields = [f.strip().lower() for f in (rows[0].keys() if rows else [])]
        if not rows or "index" not in fields or "name" not in fields:
            raise InputError("label table needs a header with columns 'index' and 'name' and >= 1 row", path)
        classes = {}
        for line, row in enumerate(rows, start=2):
            row = {(k or "").strip().lower(): (v or "").strip() for k, v in row.items()}
            try:
                index = int(row["index"])
                src = [int(v) for v in row.get("source", "").split(",") if v.strip()] or [index]
            except ValueError:
                raise InputError(f"line {line}: index and source must be integers", path) from None
            if index in classes:
                raise InputError(f"line {line}: class index {index} appears twice", path)
            classes[index] = (row["name"], src)
        if classes and 0 not in classes:  # fMRIPrep's dseg.tsv has no row for 0: it is the background
            taken = {name for name, _ in classes.values()}
            classes[0] = ("background" if "background" not in taken else "0", [0])
        if sorted(classes) != list(range(len(classes))):
            raise InputError(f"class indices must be 0..{len(classes) - 1}, got {sorted(classes)}", path)
        try:
            return cls.from_classes([classes[k] for k in range(len(classes))])
        except ValueError as e:
            raise InputError(str(e), path) from None


def edit_label_map(label_map: LabelMap, drop: Sequence[str] = (), merge: Sequence[str] = ()) -> LabelMap:
    """Apply command-line edits: ``drop`` items like "7" or "6,7"; ``merge`` items like "3,4" or "3,4=fluid".

    Malformed items raise InputError naming the option (--drop-label / --merge-label).
    """
    for item in drop:
        label_map = label_map.drop(*_ints(item, "--drop-label"))
    for item in merge:
        values, _, name = item.partition("=")
        label_map = label_map.merge(_ints(values, "--merge-label"), name.strip() or None)
    return label_map


def _ints(text: str, option: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise InputError(f"expected comma-separated label values, got {text!r}", option) from None


# The Schneider et al. (2019) record: background + its 7 labels (8 classes), source value = class index.
SCHNEIDER_LABELS = LabelMap.identity(
    (
        "background",
        "white matter",
        "grey matter",
        "cerebrospinal fluid",
        "ventricles",
        "subcortical",
        "vessels",
        "sagittal sinus",
    )
)
# The original's reduced set: the sagittal sinus suppressed (sent to the background), 7 classes.
SCHNEIDER_REDUCED_LABELS = SCHNEIDER_LABELS.drop(7)
# The demo cohort stores Schneider's source values 1 white matter, 2 grey matter, 3 cerebrospinal fluid.
DEMO_LABELS = LabelMap.identity(SCHNEIDER_LABELS.names[:4])
# Pretraining task of the demo (a different label set, as Glasgow -> Schneider): white matter vs the rest of
# the brain. It teaches the tissue contrast and the brain outline but not the GM/CSF split fine-tuning adds.
DEMO_PRETRAIN_LABELS = DEMO_LABELS.merge([2, 3], "grey matter+cerebrospinal fluid")

LABEL_MAPS = {
    "schneider": SCHNEIDER_LABELS,
    "schneider-reduced": SCHNEIDER_REDUCED_LABELS,
    "demo": DEMO_LABELS,
    "demo-pretrain": DEMO_PRETRAIN_LABELS,
}


def get_label_map(name_or_tsv: str | os.PathLike) -> LabelMap:
    """A label map by name (``LABEL_MAPS`` keys) or from a dseg-style TSV file."""
    if str(name_or_tsv) in LABEL_MAPS:
        return LABEL_MAPS[str(name_or_tsv)]
    path = Path(name_or_tsv)
    if path.suffix.lower() in (".tsv", ".txt") or path.exists():
        return LabelMap.from_tsv(path)
    raise InputError(f"unknown label map; use one of {sorted(LABEL_MAPS)} or a .tsv file", name_or_tsv)


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
    found = sorted(folder.glob(pattern))
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
