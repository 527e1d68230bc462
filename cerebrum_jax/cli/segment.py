"""``cerebrum-jax segment``: segment NIfTI volumes with a checkpoint, writing BIDS-derivatives style files."""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import jax
import numpy as np

from cerebrum_jax import distributed, nifti, preprocess, sharding
from cerebrum_jax.checkpoint import load_checkpoint
from cerebrum_jax.errors import InputError
from cerebrum_jax.segment import NORMALIZATIONS, labels_from, segment

DEFAULT_WEIGHTS = ("weights/glasgow", "weights/demo")
_REPO = Path(__file__).resolve().parents[2]


def add_parser(sub) -> None:
    p = sub.add_parser(
        "segment",
        help="segment whole NIfTI volumes (labels, probabilities, dseg.tsv)",
        description=(
            "Segment each input volume with one forward pass of the network over the whole volume and "
            "write OUT/<stem>_desc-cerebrum_dseg.nii.gz (uint8 labels), "
            "OUT/<stem>_desc-cerebrum_probseg.nii.gz (float32, classes on the 4th axis) and OUT/dseg.tsv, "
            "with the input's affine and header. All inputs are checked before any work starts."
        ),
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT.nii[.gz]", help="3-D NIfTI volumes to segment")
    p.add_argument(
        "--weights",
        metavar="CKPT_DIR",
        help="cerebrum-jax checkpoint directory (default: weights/glasgow if present, else weights/demo)",
    )
    p.add_argument("--out", required=True, metavar="OUT_DIR", help="output directory (created if needed)")
    p.add_argument(
        "--normalize",
        choices=NORMALIZATIONS,
        help="input normalisation: zscore (per volume), voxelwise (the checkpoint's mean/std volumes) "
        "or none (default: what the checkpoint was trained with)",
    )
    p.add_argument("--no-probseg", action="store_true", help="do not write the probability maps")
    sharding.add_performance_args(p)  # --mesh, --remat, --precision
    distributed.add_distributed_args(p)  # --distributed: the inputs split across processes
    for action in p._actions:  # segment's meanings of the shared options
        if action.dest == "mesh":
            action.help = (
                "device mesh DATAxSPACE, e.g. 1x4: each volume split along depth over 4 devices (its grid "
                "depth / 8 must divide by SPACE); default: one device, no sharding"
            )
        elif action.dest == "remat":
            action.help = "ignored by segment (there is no backward pass); accepted for finetune's options"
        elif action.dest == "precision":
            action.help = "bf16: bfloat16 convolutions with float32 parameters and softmax (default float32)"
    p.set_defaults(func=run)


def resolve_weights(weights: str | None) -> Path:
    """The checkpoint directory to use: ``weights``, else the first default found (cwd, then repo)."""
    if weights is not None:
        return Path(weights)
    for name in DEFAULT_WEIGHTS:
        for base in (Path.cwd(), _REPO):
            if (base / name).is_dir():
                return base / name
    raise InputError(
        "no checkpoint found: neither weights/glasgow nor weights/demo exists "
        "(run 'make weights' or pass --weights)",
        "--weights",
    )


def output_stem(path: Path) -> str:
    """``sub-01_T1w.nii.gz`` -> ``sub-01_T1w``."""
    name = path.name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return path.stem


def output_files(out: Path, stem: str, probseg: bool = True) -> list[Path]:
    """The files ``segment`` writes for one input of stem ``stem`` (dseg.tsv aside)."""
    prefix = out / f"{stem}_desc-cerebrum"
    return [Path(f"{prefix}_probseg.nii.gz")] * probseg + [Path(f"{prefix}_dseg.nii.gz")]


def check_inputs(paths: list[Path], out: Path | None = None, probseg: bool = True, grid_check=None) -> None:
    """Load every input once (and drop it) so a bad file stops the run before anything is written.

    With ``out``: also refuse output names that collide or are taken by directories. ``grid_check``:
    called with each input's shape, raises ValueError when the run cannot take it (named in an InputError).
    """
    stems: dict[str, Path] = {}
    for path in paths:
        data, _ = nifti.load_nifti(path)
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
        for target in output_files(out, stem, probseg) if out is not None else []:
            if target.is_dir():
                raise InputError("output name is taken by a directory", target)
    if out is not None and (out / "dseg.tsv").is_dir():
        raise InputError("output name is taken by a directory", out / "dseg.tsv")


def performance_options(args: argparse.Namespace, config):
    """(model config with --precision, mesh of --mesh or None for one unsharded device); --remat is ignored.

    A bad --mesh (malformed, or not the number of devices there are) is an InputError.
    """
    try:
        local = jax.local_devices() if distributed.is_running() else None  # each process: its own devices
        config, mesh = sharding.apply_performance_args(args, config, local)
    except ValueError as e:
        raise InputError(str(e), "--mesh") from None
    if args.mesh is not None and mesh.shape["data"] != 1:
        raise InputError(f"segment splits one volume at a time: use 1xN, not {args.mesh}", "--mesh")
    return dataclasses.replace(config, remat=False), (mesh if args.mesh is not None else None)


def dseg_tsv(classes: list[str]) -> str:
    """BIDS dseg.tsv text: a header ``index<TAB>name`` and one row per class."""
    return "index\tname\n" + "".join(f"{i}\t{name}\n" for i, name in enumerate(classes))


@distributed.guarded("segment")
def run(args: argparse.Namespace) -> int:
    """Check the checkpoint, options and every input first; then segment; dseg.tsv is written last.

    Distributed: each process checks and segments its share of the inputs (``distributed.share``) on its
    own devices; process 0 writes dseg.tsv once every process is done."""
    if distributed.wanted(args):
        distributed.initialize(args)  # before anything creates a JAX backend
    weights = resolve_weights(args.weights)
    paths = [Path(p) for p in args.inputs]
    mine = distributed.share(paths)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError("exists and is not a directory", out)
    ckpt = load_checkpoint(weights)  # checks params and normalisation volumes against the config
    normalization = args.normalize or ckpt.normalization
    if normalization == "voxelwise" and ckpt.norm_volumes is None:
        raise InputError("--normalize voxelwise needs a checkpoint with mean/std volumes", weights)
    if ckpt.config.n_classes > 256:
        raise InputError(f"{ckpt.config.n_classes} classes do not fit uint8 labels", weights)
    config, mesh = performance_options(args, ckpt.config)
    grid_check = None
    if mesh is not None:
        vols = ckpt.norm_volumes if normalization == "voxelwise" else None

        def grid_check(shape):
            grid = np.shape(vols["mean"]) if vols is not None else preprocess.grid_for(shape)
            sharding.check_divisible((1, *grid), mesh)

    def check():
        distributed.unique_names(paths, output_stem)  # names of every input; the files of this share
        check_inputs(mine, out, probseg=not args.no_probseg, grid_check=grid_check)

    distributed.agree(check)
    where = "one device" if mesh is None else f"mesh {args.mesh}"
    where += (
        f", {distributed.describe()}: {len(mine)} of {len(paths)} inputs" if distributed.is_running() else ""
    )
    print(
        f"weights: {weights} ({config.n_classes} classes, normalisation {normalization}, "
        f"{config.compute_dtype}, {where})",
        flush=True,
    )
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)  # fails fast on an unwritable place, before any compute
    try:
        for path in mine:
            start = time.perf_counter()
            data, img = nifti.load_nifti(path)
            probs = segment(
                data,
                ckpt.params,
                config,
                normalization=normalization,
                norm_volumes=ckpt.norm_volumes,
                mesh=mesh,
            )
            seconds = time.perf_counter() - start
            probseg, dseg = output_files(out, output_stem(path), probseg=True)
            if not args.no_probseg:
                nifti.save_nifti(probseg, probs, like=img, dtype=np.float32)
            nifti.save_nifti(dseg, labels_from(probs), like=img, dtype=np.uint8)
            prefix = out / f"{output_stem(path)}_desc-cerebrum"
            print(f"{path}: shape {data.shape}, segmented in {seconds:.1f} s -> {prefix}_*", flush=True)
        distributed.barrier("segmented")
        if distributed.is_main():
            nifti.write_text(out / "dseg.tsv", dseg_tsv(ckpt.classes))
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
    return 0
