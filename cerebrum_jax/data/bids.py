"""BIDS derivatives: file names, dataset_description.json, JSON sidecars, and offline validation of them.

An output folder of ``segment`` and a fine-tuning run directory are derivative datasets (BIDS 1.10,
"BIDS Derivatives"): ``dataset_description.json`` with DatasetType "derivative", GeneratedBy (name,
version, git commit) and SourceDatasets when the input lies in a dataset with its own
``dataset_description.json`` (or is the fine-tuning data root); one JSON sidecar per dseg/probseg.

File names: ``<entities>_space-orig_desc-cerebrum_{dseg,probseg}.nii.gz``. The entities are those of the
input's name (``sub-019_ses-1_T1w.nii.gz`` -> ``sub-019_ses-1``; the suffix is dropped, since the
derivative is a segmentation, not a T1w); a name that is not BIDS keeps its stem. ``space-orig`` says the
file is on the input image's own voxel grid, with its affine and header: ``predictor`` always brings its
probabilities back to that grid (also when a model resamples to its voxel size first).

Label tables (``dseg.tsv``) are read and written by ``labels``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from cerebrum_jax.errors import InputError
from cerebrum_jax.fsafe import write_text

BIDS_VERSION = "1.10.0"
NAME = "cerebrum-jax"
# entity keys in the order the specification writes them (appendix "Entity table")
ENTITY_ORDER = (
    "sub ses sample task tracksys acq nuc voi ce trc stain rec dir run mod echo flip inv mt part proc hemi "
    "space split recording chunk seg res den label desc"
).split()
LABEL = r"[A-Za-z0-9]+"
SEG_NAME = re.compile(rf"^sub-{LABEL}(_[a-z]+-{LABEL})*_(dseg|probseg)\.nii(\.gz)?$")
EXTENSIONS = (".nii.gz", ".img.gz", ".hdr.gz", ".nii", ".mgz", ".mgh", ".img", ".hdr")  # nifti's volumes
EXTENSIONS += (".surf.gii", ".shape.gii", ".json", ".tsv")


def split_name(name: str) -> tuple[dict[str, str], str | None, str]:
    """(entities {key: label}, suffix or None, extension) of a file name; entities only when BIDS-like.

    ``sub-01_ses-2_T1w.nii.gz`` -> ({"sub": "01", "ses": "2"}, "T1w", ".nii.gz"); a part that is not
    ``key-label`` ends the entities (it is the suffix when last): ``sub-002_uni_unbiased.nii.gz`` ->
    ({"sub": "002"}, None, ".nii.gz"); ``brain.nii.gz`` -> ({}, None, ".nii.gz").
    """
    ext = next((e for e in EXTENSIONS if name.endswith(e)), Path(name).suffix)
    stem = name[: len(name) - len(ext)] if ext else name
    entities, parts = {}, stem.split("_")
    for i, part in enumerate(parts):
        key, sep, label = part.partition("-")
        if not sep or not re.fullmatch(LABEL, label) or not re.fullmatch("[a-z]+", key):
            return entities, (part if entities and i == len(parts) - 1 else None), ext
        entities[key] = label
    return entities, None, ext


def join_entities(entities: dict[str, str]) -> str:
    """``key-label`` parts joined by '_' in the specification's order (unknown keys before space)."""
    rank = {k: i for i, k in enumerate(ENTITY_ORDER)}
    keys = sorted(entities, key=lambda k: rank.get(k, rank["space"] - 0.5))
    return "_".join(f"{k}-{entities[k]}" for k in keys)


def derivative_prefix(source: str | Path, space: str | None = "orig") -> str:
    """The name prefix of the derivatives of ``source`` (an input file's path or a subject id).

    BIDS names keep their entities (the suffix, ``desc`` and ``space`` dropped) and get ``space``;
    other names keep their stem (with ``_space-<space>`` appended).
    """
    name = Path(source).name
    entities, _, ext = split_name(name)
    if not entities and re.fullmatch(rf"sub-{LABEL}", name):
        entities = {"sub": name[4:]}
    if entities:
        entities = {k: v for k, v in entities.items() if k not in ("desc", "space")}
        if space:
            entities["space"] = space
        return join_entities(entities)
    stem = name[: len(name) - len(ext)] if ext else name
    return f"{stem}_space-{space}" if space else stem


def find_dataset_root(path: str | Path) -> Path | None:
    """The nearest folder at or above ``path`` holding a dataset_description.json, else None."""
    path = Path(path).absolute()
    for folder in [path, *path.parents] if path.is_dir() else path.parents:
        if (folder / "dataset_description.json").is_file():
            return folder
    return None


def read_description(folder: str | Path | None) -> dict | None:
    """The dataset_description.json object of a dataset folder (None: no folder or no such file);
    InputError naming the file when it is not JSON or not a JSON object."""
    if folder is None or not (path := Path(folder) / "dataset_description.json").is_file():
        return None
    try:
        desc = json.loads(path.read_text())
    except (OSError, ValueError) as e:  # ValueError: not JSON, not UTF-8
        raise InputError(f"not a readable JSON file ({type(e).__name__}); fix or remove it", path) from None
    if not isinstance(desc, dict):
        raise InputError(f"must be a JSON object, not a {type(desc).__name__}; fix or remove it", path)
    return desc


def source_dataset(folder: str | Path | None) -> dict | None:
    """SourceDatasets entry {URL (file URI), DOI when the dataset declares one} of a dataset folder."""
    if folder is None:
        return None
    folder = Path(folder).absolute()
    entry = {"URL": folder.as_uri()}
    desc = read_description(folder) or {}
    if isinstance(desc.get("DatasetDOI"), str) and desc["DatasetDOI"]:
        entry["DOI"] = desc["DatasetDOI"]
    return entry


def dataset_description(version: str, commit: str | None, sources: list[dict] | None = None) -> dict:
    """The derivative dataset_description of cerebrum-jax ``version`` at git ``commit`` (None: unknown)."""
    generated = {"Name": NAME, "Version": version}
    generated["Description"] = (
        "CEREBRUM-7T (Svanera et al., Human Brain Mapping 2021, doi:10.1002/hbm.25636) in JAX; "
        + (f"git commit {commit}" if commit else "git commit unknown")
    )
    desc = {
        "Name": "cerebrum-jax segmentations",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [generated],
    }
    if sources:
        desc["SourceDatasets"] = sources
    return desc


def write_dataset_description(folder, commit: str | None, sources: list[dict] | None = None) -> Path:
    """Write ``folder``/dataset_description.json (atomically); returns its path."""
    from cerebrum_jax.shipped import version

    text = json.dumps(dataset_description(version(), commit, sources), indent=2) + "\n"
    return write_text(Path(folder) / "dataset_description.json", text)


def source_uri(path: str | Path) -> str:
    """The file URI (absolute) of an input, for a sidecar's Sources."""
    return Path(path).absolute().as_uri()


def seg_sidecar(
    *,
    kind: str,
    sources: list[str],
    checkpoint: str,
    classes: list[str],
    normalization: str,
    brain_mask: bool,
    spacing_mm=None,
    description: str = "",
    tta_axes=(),
) -> dict:
    """Sidecar of a dseg ("dseg": labels) or probseg ("probseg": class probabilities on the 4th axis).

    BIDS fields: Description, Sources (file URIs of the inputs), Manual (false). cerebrum-jax fields:
    Checkpoint (the weights' folder), Classes (names, index = label value / 4th-axis index),
    Normalization (the network input's), BrainMaskApplied (whether a brain mask zeroed the image and
    restricted the normalisation), VoxelSizeMm, TestTimeMirrorAxes (the voxel axes whose mirror images
    were averaged into the prediction; [] = none).
    """
    what = "labels (argmax)" if kind == "dseg" else "class probabilities along the 4th axis"
    out = {
        "Description": description or f"CEREBRUM-7T {what}",
        "Sources": list(sources),
        "Manual": False,
        "Checkpoint": str(checkpoint),
        "Classes": list(classes),
        "Normalization": normalization,
        "BrainMaskApplied": bool(brain_mask),
        "TestTimeMirrorAxes": [int(a) for a in tta_axes],
    }
    if spacing_mm is not None:
        out["VoxelSizeMm"] = [round(float(s), 6) for s in spacing_mm]
    return out


def sidecar_path(nifti_path: str | Path) -> Path:
    """``x_dseg.nii.gz`` -> ``x_dseg.json``."""
    path = Path(nifti_path)
    _, _, ext = split_name(path.name)
    return path.with_name(path.name[: len(path.name) - len(ext)] + ".json")


def write_sidecar(nifti_path: str | Path, fields: dict) -> Path:
    return write_text(sidecar_path(nifti_path), json.dumps(fields, indent=2) + "\n")


def write_segment_description(folder, inputs) -> Path:
    """dataset_description.json of a ``segment`` output folder; SourceDatasets: the datasets the ``inputs``
    lie in, where they have a dataset_description.json (the sidecars come with each file,
    ``export.write_segmentation``)."""
    roots = sorted({r for r in (find_dataset_root(src) for src in inputs) if r is not None})
    return write_dataset_description(folder, git_commit(), [source_dataset(r) for r in roots] or None)


def foreign_description(folder: str | Path) -> str | None:
    """What makes ``folder`` somebody else's dataset, or None: the kind of the dataset_description.json
    there when cerebrum-jax did not write it (a raw dataset: DatasetType "raw" or none; another
    pipeline's derivative). ``segment`` writes its derivative files only into a folder of its own."""
    path = Path(folder) / "dataset_description.json"
    if not path.exists():
        return None
    try:
        desc = json.loads(path.read_text())
    except (OSError, ValueError):
        return "an unreadable dataset_description.json"
    if not isinstance(desc, dict) or desc.get("DatasetType", "raw") != "derivative":
        return "a raw BIDS dataset's dataset_description.json"
    names = [g.get("Name") for g in desc.get("GeneratedBy") or [] if isinstance(g, dict)]
    if NAME not in names:
        return f"the dataset_description.json of another pipeline's derivative ({', '.join(map(str, names))})"
    return None


def git_commit() -> str | None:
    """The commit of the cerebrum-jax checkout that runs (None outside a git checkout)."""
    import subprocess

    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parents[1],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# ----------------------------------------------------------------------------------------------------------
# Offline validation: the rules of the specification that can be checked without the bids-validator

_DESC_TYPES = {"Name": str, "BIDSVersion": str, "DatasetType": str, "GeneratedBy": list}
_SIDECAR_TYPES = {
    "Description": str,
    "Sources": list,
    "Manual": bool,
    "Checkpoint": str,
    "Classes": list,
    "Normalization": str,
    "BrainMaskApplied": bool,
}


def _check_description(folder: Path) -> list[str]:
    path = folder / "dataset_description.json"
    try:
        desc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return [f"{path}: missing or not JSON ({type(e).__name__})"]
    if not isinstance(desc, dict):
        return [f"{path}: must be a JSON object"]
    problems = [
        f"{path}: {k} must be a {t.__name__}"
        for k, t in _DESC_TYPES.items()
        if not isinstance(desc.get(k), t)
    ]
    if desc.get("DatasetType") != "derivative":
        problems.append(f"{path}: DatasetType must be 'derivative'")
    for i, g in enumerate(desc.get("GeneratedBy") or [None]):
        if not isinstance(g, dict) or not isinstance(g.get("Name"), str) or not g["Name"]:
            problems.append(f"{path}: GeneratedBy[{i}] needs a Name")
        elif any(not isinstance(g.get(k, ""), str) for k in ("Version", "Description", "CodeURL")):
            problems.append(f"{path}: GeneratedBy[{i}] Version/Description/CodeURL must be strings")
    for i, s in enumerate(desc.get("SourceDatasets", [])):
        if (
            not isinstance(s, dict)
            or not s
            or any(not isinstance(s.get(k, ""), str) for k in ("URL", "DOI", "Version"))
        ):
            problems.append(f"{path}: SourceDatasets[{i}] must hold URL/DOI/Version strings")
    return problems


def _check_seg(path: Path) -> list[str]:
    problems = []
    entities, suffix, _ = split_name(path.name)
    if not SEG_NAME.match(path.name):
        problems.append(f"{path}: name does not match sub-<label>[_<key>-<label>...]_(dseg|probseg).nii[.gz]")
    elif list(entities) != sorted(entities, key=lambda k: ENTITY_ORDER.index(k) if k in ENTITY_ORDER else -1):
        problems.append(f"{path}: entities {list(entities)} are not in the specification's order")
    elif any(k not in ENTITY_ORDER for k in entities):
        problems.append(f"{path}: unknown entities {[k for k in entities if k not in ENTITY_ORDER]}")
    side = sidecar_path(path)
    try:
        fields = json.loads(side.read_text())
    except (OSError, ValueError) as e:
        return problems + [f"{side}: missing or not JSON ({type(e).__name__})"]
    for key, typ in _SIDECAR_TYPES.items():
        if not isinstance(fields.get(key), typ):
            problems.append(f"{side}: {key} must be a {typ.__name__}")
    if not all(isinstance(s, str) and s for s in fields.get("Sources") or []):
        problems.append(f"{side}: Sources must be non-empty strings (URIs)")
    if suffix == "dseg" and not any((d / "dseg.tsv").is_file() for d in [path.parent, *path.parents]):
        problems.append(f"{path}: no dseg.tsv beside it or above it")
    return problems


def validate_dataset(folder: str | Path) -> list[str]:
    """Problems (one line each) of a derivative dataset folder against the offline-checkable rules:
    dataset_description.json (required fields, types, DatasetType derivative, GeneratedBy Name), each
    dseg/probseg under it (name pattern, entity order, a JSON sidecar with the fields ``seg_sidecar``
    writes and their types, a dseg.tsv for labels). An empty list: valid."""
    folder = Path(folder)
    problems = _check_description(folder)
    segs = [p for p in sorted(folder.rglob("*.nii*")) if re.search(r"_(dseg|probseg)\.nii", p.name)]
    for path in segs:
        problems += _check_seg(path)
    return problems
