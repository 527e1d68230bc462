"""Experiment configs of the fine-tuning loop: one frozen dataclass, loaded by name or file, overridable.

An experiment is ``experiments/<name>.py`` defining ``get_config() -> TrainConfig`` (start from
``TrainConfig()`` and ``override`` what differs), or a JSON file {key: value}. Every key must be a
``TrainConfig`` field: an unknown key is an InputError naming the file (the CLI: one line, exit 2), and
so is a value of the wrong type or out of range (checked from the field annotations in ``__post_init__``,
naming the key).

The keys stay flat (they are the file format: config.json, ``--set KEY=VALUE``, the ``--resume``
comparison of ``runguard``), and each part of a fold gets only its typed section, checked once when the
config is built: ``data_config`` (``DataConfig``: dataset, fold, preparation), ``init_config``
(``InitConfig``: the initial network), ``loss_config`` (``losses.LossConfig``), ``augment_config``
(``augment.AugmentConfig``), ``phase("warmup" | "finetune")`` (``PhaseConfig``: learning rate and
epochs), ``loop`` (``LoopConfig``, the epoch loop's schedule), ``runtime_config`` (``RuntimeConfig``: how
to compute), ``output_config`` (``OutputConfig``: the test prediction's mirroring, what the report
draws). Every key belongs to one section (tested); the shared vocabularies (normalisations, precisions)
are in ``choices``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import numbers
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cerebrum_jax.choices import CONFIG_NORMALIZATIONS as NORMALIZATIONS
from cerebrum_jax.choices import PRECISIONS
from cerebrum_jax.errors import InputError
from cerebrum_jax.experiment.sections import (
    DataConfig,
    InitConfig,
    OutputConfig,
    PhaseConfig,
    RuntimeConfig,
)
from cerebrum_jax.shipped import shipped_dir
from cerebrum_jax.train.schedule import LoopConfig

PHASES = ("warmup", "finetune")
TEST_MASKS = ("auto", "file", "labels", "none")
LR_SCHEDULES = ("plateau", "cosine")
MIRRORS = ("none", "lr", "all")  # augment_mirror and tta: no axis, the left-right one, every voxel axis
RANGES = {  # TrainConfig key: (lowest, highest or None)
    "last_layer": (1, 14),
    "epochs_warmup": (0, None),
    "epochs_finetune": (0, None),
    "augment_views": (0, None),
    "patience": (0, None),
    "plateau_patience": (0, None),
    "batch_size": (1, None),
    "n_filters": (1, 512),
    "fold": (1, None),
    "margin": (0, None),
    "seed": (0, 2**32 - 1),
    "lr_warmup": (0, None),
    "lr_finetune": (0, None),
    "min_lr": (0, None),
}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a fine-tuning fold depends on. Defaults: the original's AHEAD command
    (github.com/rockNroll87q/cerebrum7t, fine_tuning.py; docs/DESIGN.md).

    Data: data (dataset root; None = the offline demo cohort, built at demo_root on first use), layout
    ("auto", "schneider" or "bids"), contrast (the Schneider image: uni, inv1, inv2, t1, t2s), seg_name /
    mask_name (BIDS layout only: labels ``sub-*/seg/*_<seg_name>.nii.gz``, default "dseg"; optional brain
    mask ``sub-*/seg/*_<mask_name>.nii.gz``, default None = the mask from the labels > 0), labels (label
    map name of labels.LABEL_MAPS or a dseg-style TSV), drop_labels / merge_labels (command-line style
    edits, e.g. ("7",), ("3,4=fluid",)), grid (D, H, W) voxels (multiples of 8; None =
    the largest subject's brain box rounded up), voxel_mm (resample first; None = keep), margin (voxels
    around the brain box), fold (1-based leave-one-out fold: it tests the fold-th subject), val_subject
    (hold one out for validation; None = the training subjects), normalization (the network input):
    "zscore" = each volume z-scored inside its brain mask; "voxelwise" = voxel-by-voxel z-score with the
    mean and std volumes (std 0 -> 1) of the fold's TRAINING subjects (never a validation-only or the test
    subject) on the network grid, zero outside the brain mask, applied to every subject and saved in
    checkpoints/best for ``segment``; "auto" (default) = what the initial checkpoint was trained with:
    voxelwise for a voxelwise checkpoint (its own volumes are not reused: they are recomputed from the
    training subjects), zscore for a zscore one (e.g. the Glasgow model converted without --mean/--std)
    and, since fine-tuning always normalises, zscore for one that declares "none" (raw input).
    test_mask (how every subject of a fold, the test subject too, is masked, so that training and test
    inputs are of one kind and a new subject can be prepared the same way): "file" = the dataset's
    brain-mask files (Schneider layout: none; BIDS: mask_name); "none" = no mask, each image cropped to
    the box of its own head foreground (intensities only, never labels) + margin; "labels" = the mask is
    each subject's manual labels > 0, the test subject's too: the original paper's protocol, which hands
    the brain's outer boundary to the network and is stated in the report; "auto" (default) = "file"
    when every subject has a mask file, else "none". subject_shares (the training subjects dealt into that
    many shares, each filling its own block of every batch's rows, so that a process reads only the
    shares its devices' rows draw from: ``shares``; None = one per group of processes along the mesh's
    "data" axis in a distributed run, else 1: any subject may land in any row).
    Model: weights (checkpoint dir; None = weights/glasgow if present, else weights/demo for the demo
    cohort and from scratch for any other data, ``fold.start_weights``; "none" = train from scratch:
    random init with n_filters level-1 channels (default 24, the published width), no warm-up phase),
    dropout (rate 0.1 at levels 2-3 when True),
    last_layer (1..14: how many of the last layers get new weights).
    Training: loss ("dice": the original's multilabel soft Dice; "ce": categorical cross-entropy; "ce+dice":
    their sum), class_weights ("balanced": sklearn-style weights from the training labels' class
    frequencies; "sqrt": their square roots; "thin": balanced for the vessel-like classes, 1 for the
    others; or "none"). The class weights weight the cross-entropy only
    (each voxel's -log p by its class's weight), in training and in the validation loss: with loss "dice"
    they have no effect at all, with "ce+dice" they weight only the cross-entropy term. skeleton_classes
    (class names whose skeleton recall, Kirchhoff et al. 2024, is added to the loss times skeleton_weight;
    None = the vessel-like classes of the label map, ``skeleton.VESSEL_LIKE``; [] = none).
    lr_warmup / lr_finetune (Adam learning rates),
    epochs_warmup / epochs_finetune (max epochs per phase; 0 skips the phase),
    batch_size (views per step), augment_views (random views per training volume per epoch; 0 = the
    volumes as they are), augment (AugmentConfig overrides), augment_voxel_mm (the voxel size, mm, the
    augmentation's voxel ranges are meant for: shifts, elastic sigmas and the Gaussian blend are scaled
    to the fold's voxels, ``fold.fold_augment_config``; None = used as given), augment_mirror ("none";
    "lr": each view mirrored across the left-right axis with probability 0.5, the voxel axis nearest the
    world's left-right in the training images' affines; "all": each voxel axis so, nnU-Net's; never for
    a label map with left and right classes), tta (the test subject's prediction averaged over its
    mirror images: "none", "lr" or "all" as for augment_mirror; recorded in the checkpoint, so that
    ``segment`` predicts the same way unless told otherwise), patience (early
    stopping, epochs), plateau_factor / plateau_patience / min_lr (reduce-on-plateau), lr_schedule
    ("plateau", the original's reduce-on-plateau, or "cosine": each phase's rate from its lr down to
    min_lr over its epochs), lr_hold (cosine: the share of each phase's epochs held at its lr first), seed.
    Output: prob_class (class name whose probability map is drawn; None = vessels if present, else the
    last class); surface_classes (class names whose 3-D surfaces, manual and predicted, the report shows
    and writes as GIfTI; None = white matter, grey matter and vessels where the label map has them, else
    every class; an empty list = none).
    Performance (``sharding``): mesh ("DATAxSPACE", e.g. "1x4": volumes and activations split along depth
    over 4 devices; None = one device, no sharding), remat (recompute the full-resolution blocks in the
    backward pass), precision ("float32", or "bf16": bfloat16 convolutions with float32 parameters,
    optimizer state, softmax and loss), slab_rows (train and validate the full-resolution layers in depth
    slabs of that many rows, a multiple of 4, ``streamed``: same loss, bounded memory; 0 = the plain
    whole-volume step; None = automatic from the grid, ``streamed.auto_slab_rows``; refused with a
    mesh), distributed (join the other processes of a multi-process run, ``distributed``; the same as
    ``--distributed``).

    Values are checked on construction against the annotations below (int fields take integers but not
    true/false, float fields integers or finite floats, stored as float; tuple fields lists or tuples;
    drop_labels / merge_labels also a single item) and against their ranges: a wrong value is one
    InputError naming the key.
    """

    data: str | None = None
    demo_root: str = "data/demo"
    layout: str = "auto"
    contrast: str = "uni"
    seg_name: str = "dseg"
    mask_name: str | None = None
    labels: str = "schneider"
    drop_labels: tuple[str, ...] = ()
    merge_labels: tuple[str, ...] = ()
    grid: tuple[int, int, int] | None = (256, 352, 224)
    voxel_mm: float | None = None
    margin: int = 4
    fold: int = 1
    val_subject: str | None = None
    normalization: str = "auto"
    test_mask: str = "auto"
    subject_shares: int | None = None
    weights: str | None = None
    n_filters: int = 24
    dropout: bool = True
    last_layer: int = 3
    loss: str = "dice"
    class_weights: str = "balanced"
    skeleton_classes: tuple[str, ...] | None = None
    skeleton_weight: float = 1.0
    lr_warmup: float = 1e-4
    lr_finetune: float = 5e-4
    epochs_warmup: int = 110
    epochs_finetune: int = 110
    batch_size: int = LoopConfig.batch_size
    augment_views: int = LoopConfig.augment_views
    augment: dict = dataclasses.field(default_factory=dict)
    augment_voxel_mm: float | None = None
    augment_mirror: str = "none"
    tta: str = "none"
    patience: int = LoopConfig.patience
    plateau_factor: float = LoopConfig.plateau_factor
    plateau_patience: int = LoopConfig.plateau_patience
    min_lr: float = LoopConfig.min_lr
    lr_schedule: str = LoopConfig.lr_schedule
    lr_hold: float = LoopConfig.lr_hold
    seed: int = LoopConfig.seed
    prob_class: str | None = None
    surface_classes: tuple[str, ...] | None = None
    mesh: str | None = None
    remat: bool = False
    precision: str = "float32"
    distributed: bool = False
    slab_rows: int | None = None

    def __post_init__(self):
        hints = _field_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("drop_labels", "merge_labels"):  # "7", 7, ["6,7", 8] -> ("7",), ("6,7", "8")
                if isinstance(value, str | int) and not isinstance(value, bool):
                    value = (value,)
                if isinstance(value, list | tuple):
                    value = [str(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value]
            object.__setattr__(self, f.name, check_value(hints[f.name], value, f.name))
        if self.grid is not None and any(g <= 0 or g % 8 for g in self.grid):
            raise InputError(f"must be 3 positive multiples of 8, got {self.grid}", "grid")
        for name, (low, high) in RANGES.items():
            value = getattr(self, name)
            if value < low or (high is not None and value > high):
                allowed = f">= {low}" if high is None else f"in {low}..{high}"
                raise InputError(f"must be {allowed}, got {value}", name)
        if not 0 <= self.lr_hold < 1:
            raise InputError(f"must be in [0, 1), got {self.lr_hold}", "lr_hold")
        if not 0 < self.plateau_factor <= 1:
            raise InputError(f"must be in (0, 1], got {self.plateau_factor}", "plateau_factor")
        if self.slab_rows is not None and (self.slab_rows < 0 or self.slab_rows % 4):
            raise InputError(f"must be 0 or a positive multiple of 4, got {self.slab_rows}", "slab_rows")
        if self.subject_shares is not None and self.subject_shares < 1:
            raise InputError(f"must be at least 1, got {self.subject_shares}", "subject_shares")
        if self.voxel_mm is not None and self.voxel_mm <= 0:
            raise InputError(f"must be > 0, got {self.voxel_mm}", "voxel_mm")
        for name in ("layout", "contrast", "labels", "seg_name", "demo_root"):
            if not getattr(self, name):
                raise InputError("must not be empty", name)
        if self.normalization not in NORMALIZATIONS:
            raise InputError(
                f"must be one of {list(NORMALIZATIONS)}, not {self.normalization!r}", "normalization"
            )
        if self.lr_schedule not in LR_SCHEDULES:
            raise InputError(f"must be one of {list(LR_SCHEDULES)}, not {self.lr_schedule!r}", "lr_schedule")
        for name in ("augment_mirror", "tta"):
            if getattr(self, name) not in MIRRORS:
                raise InputError(f"must be one of {list(MIRRORS)}, not {getattr(self, name)!r}", name)
        if self.test_mask not in TEST_MASKS:
            raise InputError(f"must be one of {list(TEST_MASKS)}, not {self.test_mask!r}", "test_mask")
        if self.precision not in PRECISIONS:
            raise InputError(f"must be one of {sorted(PRECISIONS)}, not {self.precision!r}", "precision")
        # the loss and augmentation sections, built (and so checked) once by the classes that use them
        # (imported late: they import jax)
        from cerebrum_jax.train.augment import AugmentConfig
        from cerebrum_jax.train.losses import LossConfig

        if self.augment_voxel_mm is not None and self.augment_voxel_mm <= 0:
            raise InputError(f"must be > 0, got {self.augment_voxel_mm}", "augment_voxel_mm")
        if self.skeleton_weight < 0:
            raise InputError(f"must be >= 0, got {self.skeleton_weight}", "skeleton_weight")
        object.__setattr__(
            self, "_loss", LossConfig(self.loss, self.class_weights, skeleton_weight=self.skeleton_weight)
        )
        known = _field_hints(AugmentConfig)
        augment = {
            k: check_value(known[k], v, f"augment.{k}") if k in known else v for k, v in self.augment.items()
        }
        object.__setattr__(self, "_augment", AugmentConfig.from_dict(augment, "augment"))  # unknown keys too
        object.__setattr__(self, "augment", augment)

    # The typed sections, each handed only to the part that needs it (the flat keys above stay the file
    # format: config.json, --set KEY=VALUE and the --resume comparison use them).

    @property
    def loss_config(self):
        """The ``losses.LossConfig`` section (loss, class_weights, skeleton_weight), built once; its
        skeleton classes are resolved against the label map by ``fold.fold_loss_config``."""
        return self._loss

    @property
    def augment_config(self):
        """The ``augment.AugmentConfig`` section (the ``augment`` overrides), built once."""
        return self._augment

    def _section(self, cls):
        return cls(**{f.name: getattr(self, f.name) for f in dataclasses.fields(cls)})

    @property
    def data_config(self) -> DataConfig:
        """The ``DataConfig`` section: the dataset, the fold and how its subjects are prepared."""
        return self._section(DataConfig)

    @property
    def init_config(self) -> InitConfig:
        """The ``InitConfig`` section: the initial network."""
        return self._section(InitConfig)

    @property
    def runtime_config(self) -> RuntimeConfig:
        """The ``RuntimeConfig`` section: the device mesh, remat, precision, slabs, distributed."""
        return self._section(RuntimeConfig)

    @property
    def output_config(self) -> OutputConfig:
        """The ``OutputConfig`` section: what the report draws."""
        return self._section(OutputConfig)

    @property
    def loop(self) -> LoopConfig:
        """The ``LoopConfig`` section (slab_rows None, automatic, as 0: ``finetune`` resolves it first)."""
        return LoopConfig(
            batch_size=self.batch_size,
            augment_views=self.augment_views,
            patience=self.patience,
            plateau_factor=self.plateau_factor,
            plateau_patience=self.plateau_patience,
            min_lr=self.min_lr,
            seed=self.seed,
            slab_rows=self.slab_rows or 0,
            lr_schedule=self.lr_schedule,
            lr_hold=self.lr_hold,
        )

    def phase(self, name: str) -> PhaseConfig:
        """The optimizer section of phase ``name`` (one of ``PHASES``): its learning rate and max epochs."""
        if name not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, not {name!r}")
        return PhaseConfig(getattr(self, f"lr_{name}"), getattr(self, f"epochs_{name}"))

    def override(self, where: str = "config", **values: Any) -> TrainConfig:
        """A copy with ``values`` replaced; an unknown key raises InputError naming ``where``."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InputError(f"unknown config key(s) {unknown}; known: {', '.join(sorted(known))}", where)
        try:
            return dataclasses.replace(self, **values)
        except InputError as e:
            raise InputError(str(e), where) from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _field_hints(cls) -> dict:
    """{field name: resolved annotation} of a dataclass (the annotations are strings here)."""
    return typing.get_type_hints(cls)


def _describe(hint) -> str:
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe(args[0]).split(' ', 1)[1]}s"
        if len(set(args)) == 1:
            return f"a list of {len(args)} {_describe(args[0]).split(' ', 1)[1]}s"
        return f"a list ({', '.join(_describe(a) for a in args)})"
    names = {
        type(None): "null (None)",
        bool: "a boolean (true/false)",
        int: "an integer",
        float: "a finite number",
        str: "a string",
        dict: "a mapping {key: value}",
    }
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def _convert(hint, value) -> tuple[bool, Any]:
    """(whether ``value`` fits the annotation ``hint``, the value converted: float for float, tuple for
    tuple)."""
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        for alternative in typing.get_args(hint):
            ok, converted = _convert(alternative, value)
            if ok:
                return True, converted
        return False, None
    if hint is type(None):
        return value is None, None
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        return ok, int(value) if ok else None
    if hint is float:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
        return ok, float(value) if ok else None
    if hint is str:
        return isinstance(value, str), value
    if hint is dict or origin is dict:
        return isinstance(value, Mapping), dict(value) if isinstance(value, Mapping) else None
    if origin is tuple:
        if not isinstance(value, list | tuple):
            return False, None
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],) * len(value)
        if len(args) != len(value):
            return False, None
        items = [_convert(a, v) for a, v in zip(args, value, strict=True)]
        if not all(ok for ok, _ in items):
            return False, None
        return True, tuple(v for _, v in items)
    return True, value  # an annotation this checker does not know: accepted as it is


def check_value(hint, value, name: str) -> Any:
    """``value`` converted to the annotation ``hint`` (see ``_convert``); InputError naming ``name``."""
    ok, converted = _convert(hint, value)
    if not ok:
        raise InputError(f"must be {_describe(hint)}, got {value!r}", name)
    return converted


def find_config(name_or_file: str) -> Path:
    """``<name>.py`` of the experiments that ship with the package (``shipped.shipped_dir``), or an
    existing .py / .json file given by its path. A name is never looked up in the current directory: a
    config is Python and runs as code, so a folder that happens to hold an experiments/<name>.py must not
    run it unasked (give its path to run it). ``finetune`` prints which file it uses."""
    path = Path(name_or_file)
    if path.suffix in (".py", ".json"):
        if not path.is_file():
            raise InputError("config file does not exist", path)
        return path
    shipped = shipped_dir("experiments")
    if shipped is not None and "/" not in name_or_file and (shipped / f"{name_or_file}.py").is_file():
        return shipped / f"{name_or_file}.py"
    hint = f" (to run ./experiments/{name_or_file}.py, give its path)" if _local(name_or_file) else ""
    raise InputError(f"no such experiment in {shipped} (or give a .py/.json file){hint}", name_or_file)


def _local(name: str) -> bool:
    """Whether the current directory holds experiments/<name>.py (said in the refusal, never run)."""
    return (Path.cwd() / "experiments" / f"{name}.py").is_file()


def _run_experiment(path: Path):
    """Execute an experiment file and return its ``get_config()``; anything it raises (or a
    ``sys.exit``) is one InputError naming the file, not a traceback."""
    spec = importlib.util.spec_from_file_location(f"cerebrum_experiment_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        if not hasattr(module, "get_config"):
            raise InputError("experiment file defines no get_config()", path)
        return module.get_config()
    except InputError:
        raise
    except SystemExit as e:  # sys.exit() in a config: not the tool's exit status
        raise InputError(f"the experiment called sys.exit({e.code!r}) while loading", path) from None
    except Exception as e:
        reason = " ".join(str(e).split())[:200]
        raise InputError(f"cannot load experiment ({type(e).__name__}: {reason})", path) from None


def load_config(name_or_file: str | os.PathLike) -> TrainConfig:
    """The TrainConfig of an experiment name or file (see the module docstring)."""
    path = find_config(str(name_or_file))
    if path.suffix == ".json":
        try:
            values = json.loads(path.read_text())
        except (OSError, ValueError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError
            reason = " ".join(str(e).split())[:150]
            raise InputError(f"cannot read config ({type(e).__name__}: {reason})", path) from None
        if not isinstance(values, dict):
            raise InputError("a JSON config must be an object {key: value}", path)
        return TrainConfig().override(str(path), **values)
    config = _run_experiment(path)
    if not isinstance(config, TrainConfig):
        raise InputError("get_config() must return a TrainConfig", path)
    return config


def parse_value(text: str) -> Any:
    """A --set value: JSON when it parses (numbers, true/false/null, lists), else the plain string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_sets(config: TrainConfig, items: list[str]) -> TrainConfig:
    """Apply ``--set KEY=VALUE`` items (VALUE parsed by ``parse_value``; a string field whose VALUE parses
    as something else, e.g. a number, keeps VALUE's text)."""
    values = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"expected KEY=VALUE, got {item!r}", "--set")
        key, parsed = key.strip(), parse_value(value)
        hint = _field_hints(TrainConfig).get(key)
        if hint is not None and not _convert(hint, parsed)[0] and _convert(hint, value)[0]:
            parsed = value  # e.g. --set prob_class=1 or val_subject=123: a string field keeps the text
        values[key] = parsed
    return config.override("--set", **values) if values else config
