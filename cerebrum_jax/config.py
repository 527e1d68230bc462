"""Experiment configs of the fine-tuning loop: one frozen dataclass, loaded by name or file, overridable.

An experiment is ``experiments/<name>.py`` defining ``get_config() -> TrainConfig`` (start from
``TrainConfig()`` and ``override`` what differs), or a JSON file {key: value}. Every key must be a
``TrainConfig`` field: an unknown key is an InputError naming the file (the CLI: one line, exit 2).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from cerebrum_jax.errors import InputError

REPO = Path(__file__).resolve().parents[1]
PHASES = ("warmup", "finetune")
PRECISIONS = ("float32", "fp32", "bf16", "bfloat16")  # the names sharding.PRECISIONS maps to dtypes


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a fine-tuning fold depends on. Defaults: the original's AHEAD command (REFERENCE.md).

    Data: data (dataset root; None = the offline demo cohort, built at demo_root on first use), layout,
    contrast, labels (label map name of data.LABEL_MAPS or a dseg-style TSV), drop_labels / merge_labels
    (command-line style edits, e.g. ("7",), ("3,4=fluid",)), grid (D, H, W) voxels (multiples of 8; None =
    the largest subject's brain box rounded up), voxel_mm (resample first; None = keep), margin (voxels
    around the brain box), fold (1-based leave-one-out fold: it tests the fold-th subject), val_subject
    (hold one out for validation; None = the training subjects).
    Model: weights (checkpoint dir; None = weights/glasgow if present, else weights/demo), dropout
    (rate 0.1 at levels 2-3 when True), last_layer (1..14: how many of the last layers get new weights).
    Training: loss ("dice", "ce", "ce+dice"), class_weights ("balanced", "none"), lr_warmup / lr_finetune
    (Adam learning rates), epochs_warmup / epochs_finetune (max epochs per phase; 0 skips the phase),
    batch_size (views per step), augment_views (random views per training volume per epoch; 0 = the
    volumes as they are), augment (AugmentConfig overrides), patience (early stopping, epochs),
    plateau_factor / plateau_patience / min_lr (reduce-on-plateau), seed.
    Output: prob_class (class name whose probability map is drawn; None = vessels if present, else the
    last class).
    Performance (``sharding``): mesh ("DATAxSPACE", e.g. "1x4": volumes and activations split along depth
    over 4 devices; None = one device, no sharding), remat (recompute the full-resolution blocks in the
    backward pass), precision ("float32", or "bf16": bfloat16 convolutions with float32 parameters,
    optimizer state, softmax and loss).
    """

    data: str | None = None
    demo_root: str = "data/demo"
    layout: str = "auto"
    contrast: str = "uni"
    labels: str = "schneider"
    drop_labels: tuple[str, ...] = ()
    merge_labels: tuple[str, ...] = ()
    grid: tuple[int, int, int] | None = (256, 352, 224)
    voxel_mm: float | None = None
    margin: int = 4
    fold: int = 1
    val_subject: str | None = None
    weights: str | None = None
    dropout: bool = True
    last_layer: int = 3
    loss: str = "dice"
    class_weights: str = "balanced"
    lr_warmup: float = 1e-4
    lr_finetune: float = 5e-4
    epochs_warmup: int = 110
    epochs_finetune: int = 110
    batch_size: int = 1
    augment_views: int = 30
    augment: dict = dataclasses.field(default_factory=dict)
    patience: int = 10
    plateau_factor: float = 0.25
    plateau_patience: int = 5
    min_lr: float = 1e-7
    seed: int = 0
    prob_class: str | None = None
    mesh: str | None = None
    remat: bool = False
    precision: str = "float32"

    def __post_init__(self):
        for name in ("drop_labels", "merge_labels"):
            object.__setattr__(self, name, tuple(str(v) for v in getattr(self, name)))
        if self.grid is not None:
            object.__setattr__(self, "grid", tuple(int(g) for g in self.grid))
            if len(self.grid) != 3 or any(g <= 0 or g % 8 for g in self.grid):
                raise InputError(f"grid {self.grid} must be 3 positive multiples of 8", "grid")
        if not 1 <= self.last_layer <= 14:
            raise InputError(f"last_layer must be in 1..14, got {self.last_layer}", "last_layer")
        for name in ("epochs_warmup", "epochs_finetune", "augment_views", "patience", "plateau_patience"):
            if int(getattr(self, name)) < 0:
                raise InputError(f"{name} must be >= 0, got {getattr(self, name)}", name)
        if self.batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {self.batch_size}", "batch_size")
        if self.precision not in PRECISIONS:
            raise InputError(
                f"precision must be one of {sorted(PRECISIONS)}, not {self.precision!r}", "precision"
            )
        if not isinstance(self.augment, dict):
            raise InputError("augment must be a mapping of augmentation options", "augment")

    def override(self, where: str = "config", **values: Any) -> TrainConfig:
        """A copy with ``values`` replaced; an unknown key raises InputError naming ``where``."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InputError(f"unknown config key(s) {unknown}; known: {', '.join(sorted(known))}", where)
        return dataclasses.replace(self, **values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def find_config(name_or_file: str) -> Path:
    """``experiments/<name>.py`` (cwd, then the repository) or an existing .py / .json file."""
    path = Path(name_or_file)
    if path.suffix in (".py", ".json"):
        if not path.is_file():
            raise InputError("config file does not exist", path)
        return path
    for base in (Path.cwd(), REPO):
        candidate = base / "experiments" / f"{name_or_file}.py"
        if candidate.is_file():
            return candidate
    raise InputError("no such experiment (experiments/<name>.py, or a .py/.json file)", name_or_file)


def load_config(name_or_file: str | os.PathLike) -> TrainConfig:
    """The TrainConfig of an experiment name or file (see the module docstring)."""
    path = find_config(str(name_or_file))
    if path.suffix == ".json":
        try:
            values = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise InputError(f"cannot read config ({e})", path) from None
        if not isinstance(values, dict):
            raise InputError("a JSON config must be an object {key: value}", path)
        return TrainConfig().override(str(path), **values)
    spec = importlib.util.spec_from_file_location(f"cerebrum_experiment_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"cannot load experiment ({type(e).__name__}: {e})", path) from None
    if not hasattr(module, "get_config"):
        raise InputError("experiment file defines no get_config()", path)
    config = module.get_config()
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
    """Apply ``--set KEY=VALUE`` items (VALUE parsed by ``parse_value``)."""
    values = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"expected KEY=VALUE, got {item!r}", "--set")
        values[key.strip()] = parse_value(value)
    return config.override("--set", **values) if values else config
