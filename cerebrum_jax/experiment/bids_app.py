"""The BIDS App (``cerebrum-jax bids BIDS_DIR OUTPUT_DIR participant|group``, the BIDS Apps convention of
Gorgolewski et al. 2017, PLoS Comput Biol 13:e1005209): which images of a raw dataset a participant-level
run segments, where their derivatives go, and the group level's volume table and page.

Participant level: every subject's (or each ``--participant-label``'s) anatomical T1w or MP2RAGE UNIT1
image, in each session (or each ``--session-label``), filtered as fMRIPrep reads ``--bids-filter-file``
(its ``"t1w"`` query). Its derivatives mirror the raw layout: ``OUTPUT_DIR/sub-X[/ses-Y]/anat/``.
Group level: ``group_volumes.tsv`` (mm^3 per class and subject) and ``group.html`` (the table and a
thumbnail per subject, one self-contained file).
"""

from __future__ import annotations

import base64
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cerebrum_jax.data import bids, labels, nifti
from cerebrum_jax.errors import InputError
from cerebrum_jax.fsafe import write_text
from cerebrum_jax.report import html_report

SUFFIXES = ("T1w", "UNIT1")  # MPRAGE-like T1w; MP2RAGE's uniform image (BIDS: UNIT1)
# fMRIPrep's --bids-filter-file names entities in full (pybids' names); BIDS file names abbreviate them
FILTER_ENTITIES = {
    "subject": "sub",
    "session": "ses",
    "acquisition": "acq",
    "ceagent": "ce",
    "reconstruction": "rec",
    "run": "run",
    "part": "part",
    "inv": "inv",
}


@dataclass(frozen=True)
class Image:
    """One image a participant-level run segments: its path, subject and session labels ('' for none)."""

    path: Path
    subject: str
    session: str

    def out_dir(self, output_dir: Path) -> Path:
        """Where its derivatives go: OUTPUT_DIR/sub-X[/ses-Y]/anat."""
        parts = [f"sub-{self.subject}"] + ([f"ses-{self.session}"] if self.session else [])
        return Path(output_dir, *parts, "anat")


def check_labels(values, option: str) -> list[str] | None:
    """--participant-label / --session-label values without their ``sub-`` / ``ses-`` prefix (both forms
    are accepted, as fMRIPrep does); InputError for a label that is not alphanumeric (no path escapes)."""
    if not values:
        return None
    prefix = "sub-" if "participant" in option else "ses-"
    out = [v.removeprefix(prefix) for v in values]
    for v in out:
        if not re.fullmatch(bids.LABEL, v):  # a BIDS label: no separator, no '..'
            raise InputError(f"a label is letters and digits only, got {v!r}", option)
    return out


def read_filter(path: str | Path | None) -> dict:
    """The ``"t1w"`` query of a --bids-filter-file as {abbreviated entity or "suffix": allowed values};
    InputError naming the file for anything else than fMRIPrep's form."""
    if path is None:
        return {}
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"not a readable JSON filter file ({type(e).__name__})", path) from None
    if not isinstance(data, dict) or not isinstance(data.get("t1w", {}), dict):
        raise InputError('expected {"t1w": {"entity": value, ...}} (fMRIPrep\'s form)', path)
    query = {}
    for key, value in data.get("t1w", {}).items():
        if key in ("datatype", "extension"):
            continue  # anat and the volume formats, always
        name = "suffix" if key == "suffix" else FILTER_ENTITIES.get(key)
        if name is None:
            known = ", ".join(["suffix", *FILTER_ENTITIES])
            raise InputError(f"unknown entity {key!r} in the t1w query (known: {known})", path)
        values = value if isinstance(value, list) else [value]
        if not all(isinstance(v, str | int) for v in values):
            raise InputError(f"the t1w query's {key!r} must be a string or a list of strings", path)
        query[name] = {str(v) for v in values}
    return query


def find_images(bids_dir: Path, subjects=None, sessions=None, query: dict | None = None) -> list[Image]:
    """The T1w/UNIT1 images of ``bids_dir`` a participant-level run segments, sorted; InputError when a
    named subject is missing or nothing matches."""
    query = query or {}
    found = []
    folders = sorted(p for p in bids_dir.glob("sub-*") if p.is_dir())
    have = {p.name.removeprefix("sub-") for p in folders}
    missing = sorted(set(subjects or ()) - have)
    if missing:
        raise InputError(f"no subject folder for --participant-label {' '.join(missing)}", bids_dir)
    for folder in folders:
        subject = folder.name.removeprefix("sub-")
        if subjects is not None and subject not in subjects:
            continue
        for anat in sorted(folder.glob("anat")) + sorted(folder.glob("ses-*/anat")):
            session = anat.parent.name.removeprefix("ses-") if anat.parent != folder else ""
            if sessions is not None and session not in sessions:
                continue
            found += [Image(p, subject, session) for p in _anat_images(anat, query)]
    if not found:
        raise InputError(f"no {' or '.join(SUFFIXES)} image found (anat folders, filters applied)", bids_dir)
    return found


def _anat_images(anat: Path, query: dict) -> list[Path]:
    """The volumes of one anat folder whose suffix is T1w/UNIT1 and whose entities pass ``query``
    (a .hdr/.img pair counted once, by its .img)."""
    out = []
    for path in nifti.volume_files(anat):
        entities, suffix, _ = bids.split_name(path.name)
        if suffix not in query.get("suffix", SUFFIXES):
            continue
        if all(entities.get(k) in allowed for k, allowed in query.items() if k != "suffix"):
            out.append(path)
    return out


FAILURE_COLUMNS = ["participant_id", "session_id", "file", "error"]


def failure_row(image: Image, error: str) -> list[str]:
    session = f"ses-{image.session}" if image.session else "n/a"
    return [f"sub-{image.subject}", session, image.path.name, " ".join(error.split())]


def update_failures(path: Path, ran: list[Image], failures: list[tuple[Image, str]]) -> Path | None:
    """failures.tsv (participant_id, session_id, file, error): an earlier run's rows of the subjects'
    sessions this run did not try, then this run's failures; removed when none is left. The path, or None
    when removed."""
    tried = {tuple(failure_row(image, "")[:2]) for image in ran}  # a subject's session tried again
    rows = [r for r in read_failures(path) if tuple(r[:2]) not in tried]
    rows += [failure_row(image, error) for image, error in failures]
    if not rows:
        path.unlink(missing_ok=True)
        return None
    return write_text(path, tsv_text([FAILURE_COLUMNS, *rows]))


def tsv_text(rows: list[list[str]]) -> str:
    """Tab-separated lines, no quoting (BIDS TSV); a tab or line break inside a cell becomes a space."""
    return "".join("\t".join(" ".join(str(c).split()) for c in row) + "\n" for row in rows)


def read_failures(path: Path) -> list[list[str]]:
    """The rows of a failures.tsv this App wrote (none when there is no such file)."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines or lines[0].split("\t") != FAILURE_COLUMNS:
        raise InputError("is not a failures.tsv of this BIDS App (its header differs)", path)
    return [line.split("\t", 3) for line in lines[1:] if line]


# ----------------------------------------------------------------------------------------------------------
# Group level


def volume_rows(output_dir: Path) -> tuple[list[str], list[dict]]:
    """(class names of dseg.tsv, one record per label file under ``output_dir``: participant_id,
    session_id, file, mm3 {class: mm^3}, thumbnail (a PNG data URI)); InputError when there is no
    dseg.tsv or no label file."""
    tsv = output_dir / "dseg.tsv"
    if not tsv.is_file():
        raise InputError("no dseg.tsv: run the participant level into it first", output_dir)
    classes = labels.read_dseg(tsv)  # {label value: name}
    files = sorted(output_dir.glob("sub-*/**/anat/*_desc-cerebrum_dseg.nii.gz"))
    if not files:
        raise InputError("no *_desc-cerebrum_dseg.nii.gz under sub-*/: nothing to summarise", output_dir)
    rows = []
    for path in files:
        seg, img = nifti.load_nifti(path, what="label file")
        voxel_mm3 = float(abs(np.linalg.det(img.affine[:3, :3])))
        values = np.rint(seg).astype(np.int64).ravel()
        counts = np.bincount(values[values >= 0], minlength=max(classes) + 1)
        entities, _, _ = bids.split_name(path.name)
        rows.append(
            {
                "participant_id": f"sub-{entities.get('sub', '?')}",
                "session_id": f"ses-{entities['ses']}" if "ses" in entities else "n/a",
                "file": str(path.relative_to(output_dir)),
                "mm3": {name: float(counts[v]) * voxel_mm3 for v, name in classes.items()},
                "thumbnail": thumbnail(seg, max(classes) + 1),
            }
        )
    return list(classes.values()), rows


def thumbnail(seg: np.ndarray, n_classes: int, size: int = 160) -> str:
    """A PNG data URI of the label map's middle slice along its last axis, in the fold reports' label
    colours (``report.label_cmap``) on black."""
    from PIL import Image as PILImage

    from cerebrum_jax.report.figures import label_cmap  # matplotlib: only when a page is drawn

    colours = (np.array(label_cmap(n_classes).colors)[:, :3] * 255).astype(np.uint8)
    k = seg.shape[2] // 2
    rgb = colours[np.clip(np.rint(seg[:, :, k]).astype(int), 0, n_classes - 1)]
    picture = PILImage.fromarray(np.ascontiguousarray(np.rot90(rgb)))
    scale = size / max(picture.size)  # the slice's own aspect (voxels taken as square)
    shape = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
    buf = io.BytesIO()
    picture.resize(shape, PILImage.NEAREST).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def write_group(output_dir: Path, classes: list[str], rows: list[dict]) -> tuple[Path, Path]:
    """group_volumes.tsv and group.html in ``output_dir``; every name escaped in the page."""
    header = ["participant_id", "session_id", "file", *(f"{c}_mm3" for c in classes)]
    rows_tsv = [
        [r["participant_id"], r["session_id"], r["file"], *(f"{r['mm3'][c]:.1f}" for c in classes)]
        for r in rows
    ]
    table_path = write_text(output_dir / "group_volumes.tsv", tsv_text([header, *rows_tsv]))
    esc = html_report.esc
    header = [esc(h) for h in ["participant", "session", *(f"{c} (mm³)" for c in classes)]]
    body = [[r["participant_id"], r["session_id"], *(f"{r['mm3'][c]:.0f}" for c in classes)] for r in rows]
    cards = "".join(
        f'<figure><img src="{r["thumbnail"]}" alt="{esc(r["file"])}">'
        f"<figcaption>{esc(r['participant_id'])} {esc(r['session_id'])}</figcaption></figure>"
        for r in rows
    )
    sections = [
        f"<h2>Volumes per class</h2>{html_report.table(header, [[esc(v) for v in b] for b in body], 2)}",
        f'<h2>Middle slice of each label map</h2><div class="row">{cards}</div>',
    ]
    page = html_report.page(f"cerebrum-jax group report: {len(rows)} label maps", sections)
    return table_path, write_text(output_dir / "group.html", page)
