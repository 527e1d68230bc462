"""``cerebrum-jax segment``: segment NIfTI volumes with a checkpoint, writing BIDS-derivatives style files."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

import jax
import numpy as np

from cerebrum_jax.cli import options
from cerebrum_jax.data import bids, inputs, labels, nifti, preprocess
from cerebrum_jax.data.inputs import NORMALIZATIONS, Preprocessing, of_checkpoint
from cerebrum_jax.errors import InputError
from cerebrum_jax.fsafe import dir_lock, remove_leftovers
from cerebrum_jax.model.checkpoint import find_weights as resolve_weights
from cerebrum_jax.model.checkpoint import load_checkpoint
from cerebrum_jax.parallel import distributed, sharding
from cerebrum_jax.predict import export, predictor

DESCRIPTION = (
    "Segment each input volume with one forward pass of the network over the whole volume and "
    "write OUT/<prefix>_desc-cerebrum_dseg.nii.gz (uint8 labels), "
    "OUT/<prefix>_desc-cerebrum_probseg.nii.gz (float32, classes on the 4th axis) and OUT/dseg.tsv, "
    "with the input's affine and header, as a BIDS derivative dataset (dataset_description.json, "
    "a JSON sidecar per file); <prefix> is the input's BIDS entities (or its name without "
    "extension) and space-orig, e.g. sub-01_space-orig for sub-01_T1w.nii.gz. A fine-tuned "
    "checkpoint prepares each input exactly as its training volumes were (brain mask, crop, grid, "
    "voxel size, normalisation: recorded in its cerebrum.json), through the same predictor as the "
    "fold's own test prediction. All inputs are checked before any work starts."
)
EPILOG = (
    "Brain masks: a model fine-tuned on brain-masked inputs (test_mask file or labels) needs "
    "--mask, one mask per input in the same order (e.g. from your skull-stripping tool); without "
    "it segment stops with one line rather than segment an unmasked head it never saw. Ensembles: "
    "--weights A B C D averages the probabilities of the four fold models. --tta averages mirrored "
    "copies (default: along the left-right axis); a checkpoint fine-tuned with tta lr records it, and "
    "segment then mirrors as its fold was measured unless given --no-tta."
)


def add_parser(sub) -> None:
    p = options.command(
        sub,
        "segment",
        run,
        help="segment whole volumes: NIfTI, MGH/MGZ (labels, probabilities, dseg.tsv)",
        description=DESCRIPTION,
        epilog=EPILOG,
    )
    p.add_argument(
        "inputs",
        nargs="*",
        metavar="INPUT",
        help="3-D volumes to segment: NIfTI-1/2 (.nii, .nii.gz, a .hdr/.img pair) or FreeSurfer MGH/MGZ; "
        "outputs are NIfTI (before the options that take several values, or after --; volume names at "
        "the end of --weights are taken as inputs)",
    )
    p.add_argument(
        "--weights",
        nargs="+",
        metavar="CKPT_DIR",
        help="cerebrum-jax checkpoint directory; several: an ensemble (their probabilities averaged; same "
        "classes). Default: weights/glasgow if present, else weights/demo",
    )
    p.add_argument("--out", required=True, metavar="OUT_DIR", help="output directory (created if needed)")
    p.add_argument(
        "--mask",
        nargs="+",
        metavar="MASK.nii[.gz]",
        help="brain masks (voxels > 0.5 inside), one per input, same order and grid; the image is set to 0 "
        "outside. Needed by models trained on masked inputs",
    )
    p.add_argument(
        "--normalize",
        choices=NORMALIZATIONS,
        help="input normalisation: zscore (per volume), voxelwise (the checkpoint's mean/std volumes) "
        "or none (default: what the checkpoint was trained with)",
    )
    add_tta_args(p)
    p.add_argument("--no-probseg", action="store_true", help="do not write the probability maps")
    options.add_performance_args(  # segment's meanings of the shared options
        p,
        mesh_help="device mesh DATAxSPACE, e.g. 1x4: each volume split along depth over 4 devices (its grid "
        "depth / 8 must divide by SPACE); default: one device, no sharding",
        remat_help="ignored by segment (there is no backward pass); accepted for finetune's options",
        precision_help="bf16: bfloat16 convolutions with float32 parameters and softmax (default float32)",
    )
    options.add_distributed_args(p)  # --distributed: the inputs split across processes


def add_tta_args(p) -> None:
    """--tta / --no-tta (one of them) and --tta-axes, for segment and the BIDS App."""
    which = p.add_mutually_exclusive_group()
    which.add_argument("--tta", action="store_true", help="test-time augmentation: average mirrored copies")
    which.add_argument(
        "--no-tta",
        action="store_true",
        help="no mirrored copies, even where the checkpoint records that its fold was measured with them",
    )
    p.add_argument(
        "--tta-axes",
        default="lr",
        type=tta_axes,
        metavar="AXES",
        help="axes mirrored by --tta: lr (the voxel axis nearest the left-right axis, from the affine; "
        "default), all, or voxel axes such as 0,2 (every combination is averaged: 2^n passes)",
    )


def tta_choice(args: argparse.Namespace, models) -> tuple[str, str]:
    """(mirror axes spec for ``predictor.mirror_axes``, why): --tta's axes, none with --no-tta, else the
    checkpoints' recorded ``tta`` (the fold's test-time mirroring) where they all record the same."""
    if args.tta or args.no_tta:
        return (args.tta_axes, "--tta") if args.tta else ("none", "--no-tta")
    recorded = {ckpt.meta.get("tta", "none") for _, ckpt, _ in models}
    if len(recorded) == 1:
        return recorded.pop(), "as the checkpoint's fold was measured; --no-tta to skip"
    return "none", f"the checkpoints record different test-time mirroring {sorted(recorded)}: none"


def tta_axes(text: str) -> str:
    """argparse type of --tta-axes: ``text`` when ``predictor.mirror_axes`` takes it (a usage error
    otherwise, before any work)."""
    try:
        predictor.mirror_axes(text, np.eye(4))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def output_stem(path: Path) -> str:
    """``sub-01_T1w.nii.gz`` -> ``sub-01_space-orig``, ``brain.nii.gz`` -> ``brain_space-orig`` (``bids``)."""
    return bids.derivative_prefix(path, space="orig")


def output_files(out: Path, stem: str, probseg: bool = True) -> list[Path]:
    """The files ``segment`` writes for one input of stem ``stem`` (dseg.tsv aside)."""
    return export.output_paths(out, stem, probseg)


def check_inputs(
    paths: list[Path], out: Path | None = None, probseg: bool = True, grid_check=None, masks=None
) -> None:
    """Load every input (and its mask) once and drop it, so a bad file stops the run before anything is
    written.

    With ``out``: also refuse output names that collide or are taken by directories. ``grid_check``:
    called with each input's shape, raises ValueError when the run cannot take it (named in an InputError).
    ``masks``: one mask path per input, on the input's grid.
    """
    stems: dict[str, Path] = {}
    given = [*paths, *(masks or [])]
    for i, path in enumerate(paths):
        data, img = nifti.load_nifti(path)
        bids.read_description(bids.find_dataset_root(path))  # read for SourceDatasets at the end
        if masks is not None:
            mask, mimg = nifti.load_nifti(masks[i], what="mask")
            nifti.check_same_grid(path, img, masks[i], mimg, data.shape, mask.shape)
            if not (mask > 0.5).any():
                raise InputError("brain mask is empty (no voxel > 0.5)", masks[i])
        if grid_check is not None:
            try:
                grid_check(data.shape)
            except ValueError as e:
                raise InputError(str(e), path) from None
        del data
        stem = output_stem(path)
        if stem in stems:
            raise InputError(f"has the same output name {stem!r} as {stems[stem]}", path)
        stems[stem] = path
        if out is not None:
            check_outputs(path, out, probseg, given)
    if out is not None and (out / "dseg.tsv").is_dir():
        raise InputError("output name is taken by a directory", out / "dseg.tsv")


def check_outputs(path: Path, out: Path, probseg: bool = True, given=()) -> list[Path]:
    """The files ``segment`` writes into ``out`` for the input ``path``, checked before any work: names
    a file system takes, none of them one of the ``given`` input files, none taken by a directory."""
    targets = output_files(out, output_stem(path), probseg)
    for target in targets:
        check_name_length(path, target)
        if any(target.exists() and target.samefile(g) for g in given):
            raise InputError("is one of the inputs: segment would overwrite it; choose another --out", target)
        if target.is_dir():
            raise InputError("output name is taken by a directory", target)
    return targets


NAME_MAX = 255  # bytes of one file name on Linux's file systems (ext4, xfs, tmpfs, NFS)


def check_name_length(source: Path, target: Path) -> None:
    """InputError naming the input ``source`` when its output name ``target`` is longer than a file system
    takes: found before any work rather than after the volume was segmented."""
    size = len(os.fsencode(target.name))
    if size > NAME_MAX:
        raise InputError(
            f"its output name {target.name[:40]}... would be {size} bytes, over the file system's limit of "
            f"{NAME_MAX}: give the input a shorter name",
            source,
        )


SEGMENT_TEMPS = (".*.tmp.nii.gz", ".*.tmp.nii", ".*.tmp.json", ".*.tmp.tsv")  # fsafe.atomic_path's names


def check_out(out: Path, classes) -> None:
    """InputError unless ``out`` may take segment's derivative files: never a raw BIDS dataset or another
    pipeline's folder (their dataset_description.json would be overwritten), nor a folder whose own
    dseg.tsv differs from this model's label table and was not written by cerebrum-jax."""
    foreign = bids.foreign_description(out)
    if foreign is not None:
        raise InputError(
            f"holds {foreign}; segment writes its own dataset_description.json and dseg.tsv and never over "
            "another dataset's: choose a folder of its own, e.g. --out DATASET/derivatives/cerebrum-jax",
            out,
        )
    tsv = out / "dseg.tsv"
    ours = (out / "dataset_description.json").is_file()
    if tsv.is_file() and not ours and tsv.read_text(errors="replace") != labels.dseg_text(classes):
        raise InputError(
            "holds a dseg.tsv of other labels that segment would overwrite: choose another --out", out
        )


def performance_options(args: argparse.Namespace, config):
    """(model config with --precision, mesh of --mesh or None for one unsharded device); --remat is ignored.

    A bad --mesh (malformed, or not the number of devices there are) is an InputError.
    """
    try:
        local = jax.local_devices() if distributed.is_running() else None  # each process: its own devices
        config, mesh = options.performance_options(args, config, local)
    except ValueError as e:
        raise InputError(str(e), "--mesh") from None
    if args.mesh is not None and mesh.shape["data"] != 1:
        raise InputError(f"segment splits one volume at a time: use 1xN, not {args.mesh}", "--mesh")
    return dataclasses.replace(config, remat=False), (mesh if args.mesh is not None else None)


def load_models(args: argparse.Namespace, n_inputs: int):
    """([(checkpoint path, Checkpoint, predictor.Model)] of --weights, the mesh or None for one device),
    checked together: same classes; --normalize, --mask and --mesh against each. InputError otherwise."""
    paths = [resolve_weights(w) for w in (args.weights or [None])]
    models, mesh = [], None
    for path in paths:
        ckpt = load_checkpoint(path)  # checks params and normalisation volumes against the config
        if models and list(ckpt.classes) != list(models[0][1].classes):
            raise InputError(f"classes {ckpt.classes} differ from {models[0][1].classes} of {paths[0]}", path)
        if ckpt.config.n_classes > 256:
            raise InputError(f"{ckpt.config.n_classes} classes do not fit uint8 labels", path)
        pre = of_checkpoint(ckpt)
        if args.normalize is not None:
            if args.normalize == "voxelwise" and ckpt.norm_volumes is None:
                raise InputError("--normalize voxelwise needs a checkpoint with mean/std volumes", path)
            grid = np.shape(ckpt.norm_volumes["mean"]) if args.normalize == "voxelwise" else pre.grid
            pre = dataclasses.replace(pre, normalization=args.normalize, grid=grid)
        pre = _with_masks(pre, path, ckpt, args.mask, n_inputs)
        config, mesh = performance_options(args, ckpt.config)
        models.append((path, ckpt, predictor.Model(ckpt.params, config, pre, ckpt.norm_volumes)))
    return models, mesh


def _with_masks(pre: Preprocessing, path: Path, ckpt, masks, n_inputs: int) -> Preprocessing:
    """``pre`` checked against --mask: a model trained masked needs masks, one trained on unmasked inputs
    refuses them; a checkpoint without a preprocessing record (converted from Keras) applies given ones."""
    if masks is not None and len(masks) != n_inputs:
        raise InputError(f"{len(masks)} masks for {n_inputs} inputs: give one per input", "--mask")
    recorded = "preprocessing" in ckpt.meta
    if pre.needs_mask and masks is None:
        how = "a brain-mask file" if pre.mask == "file" else "masks made from their manual labels"
        raise InputError(
            f"this model was trained on brain-masked inputs ({how}): give --mask with one brain mask per "
            "input (an unmasked head would be an input it never saw)",
            path,
        )
    if masks is not None and not pre.needs_mask:
        if recorded:
            raise InputError(
                "this model was trained on unmasked inputs: --mask would change what it sees; leave it out",
                path,
            )
        pre = dataclasses.replace(pre, mask="file")
    return pre


def sidecar_fields(models, source: Path, mask, tta_axes=()) -> dict:
    """The JSON sidecar fields (``bids.seg_sidecar``) of one input's outputs: its source, the checkpoint(s),
    classes, normalisation, whether a brain mask zeroed the image, the test-time mirror axes."""
    return {
        "sources": [bids.source_uri(source)],
        "checkpoint": ", ".join(str(Path(p).absolute()) for p, _, _ in models),
        "classes": list(models[0][1].classes),
        "normalization": ", ".join(sorted({m.pre.normalization for _, _, m in models})),
        "brain_mask": mask is not None and any(m.pre.needs_mask for _, _, m in models),
        "tta_axes": tta_axes,
    }


def _grid_check(models, mesh):
    """Each input's network grid must split over the mesh (None: nothing to check)."""
    if mesh is None:
        return None

    def check(shape):
        for _, _, m in models:
            grid = m.pre.grid if m.pre.grid is not None else preprocess.grid_for(shape)
            sharding.check_divisible((1, *grid), mesh)

    return check


def split_inputs(args: argparse.Namespace) -> list[Path]:
    """The input volumes: the positional ones, or the NIfTI names that a greedy ``--weights A B in.nii``
    swallowed (checkpoints are directories). InputError when there are none."""
    if not args.inputs and args.weights:
        nii = [w for w in args.weights if nifti.is_volume_name(w)]
        args.weights = [w for w in args.weights if w not in nii] or None
        args.inputs = nii
    if not args.inputs:
        raise InputError(
            "no input volumes: give them before --weights/--mask, or after -- (e.g. segment --weights A B "
            "--out OUT -- in.nii.gz)",
            "INPUT",
        )
    return [Path(p) for p in args.inputs]


def _warner(path: Path):
    """A ``warn(text)`` that prints one line naming ``path`` on stderr, once per distinct text (an
    ensemble's fold models share their grid and voxel size); the run goes on."""
    said = set()

    def warn(text: str) -> None:
        if text not in said:
            said.add(text)
            print(f"{path}: warning: {text}", file=sys.stderr, flush=True)

    return warn


def _say(out: Path):
    """A ``log(text)`` printing 'OUT: text' on stdout."""
    return lambda text: print(f"{out}: {text}", flush=True)


def segment_one(
    args: argparse.Namespace, models, mesh, out: Path, path: Path, mask_path: Path | None
) -> None:
    """Segment the input ``path`` (with its brain mask ``mask_path``) and write its files into ``out``."""
    start = time.perf_counter()
    data, img = nifti.load_nifti(path)
    mask = None if mask_path is None else nifti.load_nifti(mask_path, what="mask")[0] > 0.5
    warn, spacing = _warner(path), inputs.voxel_size(img.affine)
    for _, ckpt, m in models:
        note = inputs.spacing_note(ckpt.meta.get("train_voxel_mm"), spacing, m.pre)
        if note:
            warn(note)
    spec, why = tta_choice(args, models)
    tta = predictor.mirror_axes(spec, img.affine)
    probs = predictor.ensemble(
        [m for _, _, m in models], data, img.affine, mask, tta_axes=tta, mesh=mesh, warn=warn
    )
    seconds = time.perf_counter() - start
    stem = output_stem(path)
    export.write_segmentation(
        out, stem, probs, img, probseg=not args.no_probseg, sidecar=sidecar_fields(models, path, mask, tta)
    )
    note = f" (mirrored along axes {tta}, {2 ** len(tta)} passes per model: {why})" if tta else ""
    print(
        f"{path}: shape {data.shape}, segmented in {seconds:.1f} s{note} -> {out / stem}_desc-cerebrum_*",
        flush=True,
    )


@distributed.guarded("segment")
def run(args: argparse.Namespace) -> int:
    """Check the checkpoints, options and every input first; then segment; dseg.tsv is written last.

    Distributed: each process checks and segments its share of the inputs (``distributed.share``) on its
    own devices; process 0 writes dseg.tsv and dataset_description.json once every process is done."""
    if distributed.wanted(args):
        distributed.initialize(args)  # before anything creates a JAX backend
    paths = split_inputs(args)
    mine = distributed.share(list(range(len(paths))))  # indices: masks go with their inputs
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError("exists and is not a directory", out)
    models, mesh = load_models(args, len(paths))
    masks = [Path(m) for m in args.mask] if args.mask else None

    def check():
        if out.is_dir():
            check_out(out, models[0][1].classes)
        distributed.unique_names(paths, output_stem)  # names of every input; the files of this share
        check_inputs(
            [paths[i] for i in mine],
            out,
            probseg=not args.no_probseg,
            grid_check=_grid_check(models, mesh),
            masks=None if masks is None else [masks[i] for i in mine],
        )

    distributed.agree(check)
    where = "one device" if mesh is None else f"mesh {args.mesh}"
    if distributed.is_running():
        where += f", {distributed.describe()}: {len(mine)} of {len(paths)} inputs"
    for path, _, m in models:
        print(f"weights: {path} ({m.config.n_classes} classes, {m.pre.describe()})", flush=True)
    extra = f", ensemble of {len(models)} (probabilities averaged)" if len(models) > 1 else ""
    print(f"compute: {models[0][2].config.compute_dtype}, {where}{extra}", flush=True)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)  # fails fast on an unwritable place, before any compute
    lock = dir_lock(out, "segment")  # one run at a time into OUT (InputError naming the other's pid)
    try:
        if not distributed.is_running():  # a killed segment's temporary files: ours to remove, under the lock
            remove_leftovers(out, SEGMENT_TEMPS, log=_say(out), recursive=False)
        for i in mine:
            segment_one(args, models, mesh, out, paths[i], None if masks is None else masks[i])
        distributed.barrier("segmented")
        if distributed.is_main():
            labels.write_dseg(out / "dseg.tsv", models[0][1].classes)
            bids.write_segment_description(out, paths)
    except BaseException:
        lock.release()
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
    lock.release()
    return 0
