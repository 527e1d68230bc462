"""The label map, in one place: which stored label value is which class, the class names, and the
label table file, BIDS ``dseg.tsv`` (a header ``index<TAB>name``, then one row per class).

- ``LabelMap``: source label values (as stored in the label files) -> class indices and names; the named
  maps of the Schneider record, its reduced set, the demo cohort and the demo's pretraining task
  (``get_label_map``), and the command-line edits ``--drop-label`` / ``--merge-label``
  (``edit_label_map``). A run records its map in config.json as ``LabelMap.to_source_tsv`` (a third
  column ``source``), which ``LabelMap.from_tsv`` reads back.
- ``dseg.tsv``: written by ``dseg_text`` / ``write_dseg`` (``segment``'s output folder, a fold's run
  directory, the generated cohorts); read by ``read_dseg`` ({value: name}: ``evaluate --labels``,
  ``surfaces --labels``) and ``LabelMap.from_tsv`` (``finetune --labels``). A table without a row for 0,
  as fMRIPrep writes them, gets 0 as the background (``with_background``) in every reader.
- ``read_class_names``: the class names of ``convert --classes`` (a comma list, a file of names, or a
  dseg.tsv); ``GLASGOW_CLASSES``: the published Glasgow model's 7 classes.
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

DSEG_HEADER = "index\tname"
# The classes of the published Glasgow model (the original code's trained_model/model_trained.h5), in
# output-channel order.
GLASGOW_CLASSES = (
    "background",
    "grey matter",
    "basal ganglia",
    "white matter",
    "ventricles",
    "cerebellum",
    "brainstem",
)


# ----------------------------------------------------------------------------------------------------------
# dseg.tsv


def dseg_text(names: Sequence[str]) -> str:
    """BIDS dseg.tsv text: the header ``index<TAB>name`` and one row per class, index = position."""
    return DSEG_HEADER + "\n" + "".join(f"{i}\t{name}\n" for i, name in enumerate(names))


def write_dseg(path: str | os.PathLike, names: Sequence[str]) -> Path:
    """Write ``dseg_text(names)`` to ``path`` atomically."""
    return write_text(path, dseg_text(names))


def with_background(labels: dict[int, str]) -> dict[int, str]:
    """{value: name} with 0 named 'background' when the table has no row for 0 (fMRIPrep's dseg.tsv)."""
    if 0 in labels:
        return dict(labels)
    name = "background" if "background" not in labels.values() else "0"
    return {0: name, **labels}


def _table(path: str | os.PathLike) -> list[tuple[int, dict[str, str]]]:
    """The rows of a tab-separated label table as (line number, {column (lower case): value (stripped)});
    InputError naming ``path`` unless it is UTF-8 with a header holding the columns 'index' and 'name'."""
    text = read_text(path, "label table").removeprefix("\ufeff")  # a UTF-8 BOM (spreadsheet exports)
    # QUOTE_NONE: a quote is a character of the name; csv's quoting would let a name starting with '"'
    # swallow the rows after it
    reader = csv.DictReader(io.StringIO(text), delimiter="\t", quoting=csv.QUOTE_NONE)
    fields = [f.strip().lower() for f in reader.fieldnames or []]
    if "index" not in fields or "name" not in fields:
        raise InputError("label table needs a tab-separated header with columns 'index' and 'name'", path)
    return [
        (line, {(k or "").strip().lower(): (v or "").strip() for k, v in row.items()})
        for line, row in enumerate(reader, start=2)
    ]


def read_dseg(path: str | os.PathLike) -> dict[int, str]:
    """{label value: name} of a dseg.tsv (columns 'index' and 'name'; others ignored), with 0 the
    background when it has no row for 0 (``with_background``)."""
    labels: dict[int, str] = {}
    for line, row in _table(path):
        try:
            value, name = int(row["index"]), row["name"]
        except ValueError:
            raise InputError(f"line {line} is not '<integer index>\\t<name>'", path) from None
        if value in labels or name in labels.values() or not name:
            raise InputError(f"line {line}: duplicate or empty index/name", path)
        labels[value] = name
    return with_background(labels)


def read_class_names(spec: str | None, n_classes: int) -> list[str]:
    """The ``n_classes`` class names of ``spec``: a comma-separated list ('bg,gm,wm'), or a text file with
    one name per line or 'index<TAB>name' lines (a dseg.tsv: its header is skipped); None: the Glasgow
    names for 7 classes, else class_<i>. InputError unless there are ``n_classes`` non-empty names."""
    if spec is None:
        if n_classes == len(GLASGOW_CLASSES):
            return list(GLASGOW_CLASSES)
        return [f"class_{i}" for i in range(n_classes)]
    path = Path(spec)
    if path.is_file():
        lines = [ln.strip() for ln in read_text(path, "classes file").splitlines() if ln.strip()]
        names = [ln.split("\t", 1)[-1].strip() for ln in lines if not ln.lower().startswith("index\t")]
    else:
        names = [n.strip() for n in spec.split(",")]
    if len(names) != n_classes or not all(names):
        raise InputError(f"{len(names)} class names given for a model with {n_classes} classes", spec)
    return names


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
                if pairs.get(int(v), index) != index:
                    raise ValueError(
                        f"source value {int(v)} is listed under two classes ({names[pairs[int(v)]]!r} and "
                        f"{names[index]!r})"
                    )
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
        """dseg.tsv text (``dseg_text``); written atomically when ``path`` is given."""
        text = dseg_text(self.names)
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
        table without a row for 0 (as fMRIPrep writes them) gets 0 as the background (``with_background``).
        """
        rows = _table(path)
        if not rows:
            raise InputError("label table needs a header with columns 'index' and 'name' and >= 1 row", path)
        classes, sources = {}, {}
        for line, row in rows:
            try:
                index = int(row["index"])
                sources[index] = [int(v) for v in row.get("source", "").split(",") if v.strip()] or [index]
            except ValueError:
                raise InputError(f"line {line}: index and source must be integers", path) from None
            if index in classes:
                raise InputError(f"line {line}: class index {index} appears twice", path)
            if not row["name"] or row["name"] in classes.values():
                raise InputError(f"line {line}: empty or repeated class name {row['name']!r}", path)
            classes[index] = row["name"]
        classes = with_background(classes)
        if sorted(classes) != list(range(len(classes))):
            raise InputError(f"class indices must be 0..{len(classes) - 1}, got {sorted(classes)}", path)
        try:
            return cls.from_classes([(classes[k], sources.get(k, [k])) for k in range(len(classes))])
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
