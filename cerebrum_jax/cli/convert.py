"""``cerebrum-jax convert``: Keras HDF5 -> Orbax checkpoint, --to-keras back, --download the Glasgow model."""

from __future__ import annotations

import contextlib
import os
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from cerebrum_jax.cli.options import command
from cerebrum_jax.data.labels import read_class_names
from cerebrum_jax.errors import InputError
from cerebrum_jax.model import keras as convert
from cerebrum_jax.model.spec import DIVISOR

DESCRIPTION = """\
Convert CEREBRUM-7T weights between Keras legacy HDF5 and cerebrum-jax's Orbax checkpoints.

  cerebrum-jax convert MODEL.h5 OUT_DIR [--mean MEAN.nii.gz --std STD.nii.gz] [--classes NAMES]
  cerebrum-jax convert --to-keras CKPT_DIR OUT.h5
  cerebrum-jax convert --download OUT_DIR [--h5 weights/model_trained.h5]

MODEL.h5 may be a Keras 2.2.4 model (the published model_trained.h5), a Keras 3 legacy .h5 model or a
weights-only .h5; n_filters, n_classes and activations come from its model_config (kernel shapes otherwise).
"""


def add_parser(sub) -> None:
    p = command(
        sub,
        "convert",
        run,
        help="convert Keras .h5 weights to an Orbax checkpoint and back; download the published model",
        description=DESCRIPTION,
        raw_description=True,
    )
    p.add_argument("source", metavar="SOURCE", nargs="?", help="MODEL.h5 (or CKPT_DIR with --to-keras)")
    p.add_argument(
        "dest", metavar="DEST", nargs="?", help="OUT_DIR checkpoint directory (or OUT.h5 with --to-keras)"
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--to-keras",
        action="store_true",
        help="reverse direction: write checkpoint SOURCE as Keras 2 .h5 DEST",
    )
    mode.add_argument(
        "--download",
        metavar="OUT_DIR",
        help="fetch the published Glasgow model_trained.h5 (or use the --h5 file if it exists), verify its "
        "git blob id and convert it to the checkpoint OUT_DIR",
    )
    p.add_argument(
        "--h5",
        metavar="PATH",
        help="with --download: where the .h5 is kept (default: model_trained.h5 beside OUT_DIR); an "
        "existing file is verified and used without network",
    )
    p.add_argument(
        "--url", default=convert.GLASGOW_URL, help="with --download: source URL (default: %(default)s)"
    )
    p.add_argument(
        "--blob-id",
        default=convert.GLASGOW_BLOB_ID,
        help="with --download: expected git blob id, sha1 of b'blob <size>\\0'+bytes (default: %(default)s)",
    )
    p.add_argument(
        "--mean", metavar="MEAN.nii.gz", help="voxelwise mean volume of the training set (needs --std)"
    )
    p.add_argument("--std", metavar="STD.nii.gz", help="voxelwise std volume (needs --mean; zeros become 1)")
    p.add_argument(
        "--classes",
        metavar="NAMES",
        help="class names, index order: comma-separated ('bg,gm,wm') or a text file with one name per line "
        "or 'index<TAB>name' lines (default: the Glasgow names when there are 7 classes, else class_<i>)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing output directory or .h5 file")


def run(args) -> int:
    if args.download:
        if args.source or args.dest:
            raise InputError("--download takes only OUT_DIR (and --h5 PATH), no SOURCE/DEST")
        return _download(args)
    if not (args.source and args.dest):
        raise InputError("convert needs SOURCE and DEST (or --download OUT_DIR); see --help")
    if args.to_keras:
        return _to_keras(args)
    return _to_orbax(Path(args.source), Path(args.dest), args, {})


def _check_dest(dest: Path, force: bool, kind: str = "dir") -> None:
    """Refuse an existing ``dest`` without --force, and with it anything but what ``kind`` replaces.

    kind "dir": a checkpoint directory (an empty one, or one with cerebrum.json); "file": a plain file.
    """
    from cerebrum_jax.model.checkpoint import META_FILE

    if not (dest.exists() or dest.is_symlink()):
        return
    if not force:
        raise InputError("already exists (use --force to replace it)", dest)
    if kind == "file" and dest.is_dir():
        raise InputError("is a directory; --force replaces only a file", dest)
    if kind == "dir" and not dest.is_dir():
        raise InputError("is a file; --force replaces only a checkpoint directory", dest)
    if kind == "dir" and any(dest.iterdir()) and not (dest / META_FILE).is_file():
        raise InputError(
            f"is a directory without {META_FILE}, not a checkpoint; --force will not replace it", dest
        )


def _to_keras(args) -> int:
    from cerebrum_jax.model.checkpoint import load_checkpoint

    dest = Path(args.dest)
    _check_dest(dest, args.force, kind="file")
    ckpt = load_checkpoint(args.source, require_digest=True)  # no unverified weights handed on
    convert.write_keras_h5(dest, ckpt.params, ckpt.config)
    print(f"wrote {dest} (Keras {convert.KERAS2_VERSION} layout, {ckpt.config.n_classes} classes)")
    return 0


def _norm_volumes(args) -> tuple[str, dict | None]:
    """('voxelwise', {"mean", "std"} float32 (X, Y, Z)) from --mean/--std, else ('zscore', None)."""
    if not (args.mean or args.std):
        return "zscore", None
    if not (args.mean and args.std):
        raise InputError("--mean and --std must be given together", args.mean or args.std)
    from cerebrum_jax.data.nifti import load_nifti

    mean, _ = load_nifti(args.mean, what="mean")
    std, _ = load_nifti(args.std, what="std")
    if mean.shape != std.shape:
        raise InputError(f"std shape {std.shape} differs from mean shape {mean.shape}", args.std)
    if (std < 0).any():
        raise InputError("std volume has negative voxels", args.std)
    if any(s % DIVISOR for s in mean.shape):
        raise InputError(
            f"mean/std volumes have shape {mean.shape}; the network needs every axis a multiple of {DIVISOR} "
            "(they set the grid of voxelwise normalisation)",
            args.mean,
        )
    # As the original: a voxel with std 0 (constant in the training set) is divided by 1.
    return "voxelwise", {"mean": mean, "std": np.where(std == 0, 1.0, std).astype(np.float32)}


def _to_orbax(source: Path, dest: Path, args, meta: dict) -> int:
    from cerebrum_jax.model.checkpoint import save_checkpoint

    _check_dest(dest, args.force)
    params, config, info = convert.read_keras_h5(source)
    classes = read_class_names(args.classes, config.n_classes)
    normalization, volumes = _norm_volumes(args)
    meta = {
        "source": str(source),
        "source_git_blob_sha1": convert.git_blob_id(source),
        "keras_version": info["keras_version"],
        "keras_backend": info["backend"],
        "keras_layout": info["layout"],
        **meta,
    }
    save_checkpoint(
        dest,
        params,
        config,
        classes=classes,
        normalization=normalization,
        norm_volumes=volumes,
        meta=meta,
        overwrite=args.force,
    )
    print(
        f"wrote {dest}: n_filters {config.n_filters}, {config.n_classes} classes, "
        f"{config.enc_activation}/{config.dec_activation}, normalization {normalization} "
        f"(from Keras {info['keras_version']} {source})"
    )
    return 0


def _fetch(url: str, h5: Path) -> None:
    """Download ``url`` to ``h5`` through ``h5.part`` (renamed only once complete)."""
    part = h5.with_name(h5.name + ".part")
    h5.parent.mkdir(parents=True, exist_ok=True)
    print(f"downloading {url} -> {h5}")
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(part, "wb") as out:
            while chunk := r.read(1 << 20):
                out.write(chunk)
    except (urllib.error.URLError, OSError, ValueError) as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(part)
        reason = getattr(e, "reason", None) or e
        raise InputError(
            f"cannot download {url} ({reason}); put model_trained.h5 there by hand (from "
            f"github.com/rockNroll87q/cerebrum7t, trained_model/) and run the same command again",
            h5,
        ) from None
    os.replace(part, h5)


def _download(args) -> int:
    dest = Path(args.download)
    h5 = Path(args.h5) if args.h5 else dest.parent / "model_trained.h5"
    _check_dest(dest, args.force)
    fetched = not h5.exists()
    if fetched:
        _fetch(args.url, h5)
    blob = convert.git_blob_id(h5)
    if blob != args.blob_id:
        if fetched:
            os.unlink(h5)  # a bad download must not be mistaken for the real file next time
        raise InputError(
            f"git blob id {blob} is not the published model's {args.blob_id}"
            + ("; download corrupted" if fetched else "; remove the file to download it again"),
            h5,
        )
    print(f"{h5}: git blob id {blob} verified")
    return _to_orbax(h5, dest, args, {"source_url": args.url})
