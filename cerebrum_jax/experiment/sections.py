"""The typed sections of ``config.TrainConfig``: what each part of a fold is handed instead of the whole
config (``TrainConfig.data_config``, ``.init_config``, ``.runtime_config``, ``.output_config``,
``.phase``; the loop's ``LoopConfig`` lives beside ``fit``, in ``train.schedule``). Plain frozen records,
no JAX; ``TrainConfig``'s docstring says what each key means.
"""

from __future__ import annotations

import dataclasses
import typing

from cerebrum_jax.model.spec import ModelConfig


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Which subjects a fold reads and how it prepares them (``fold.load_fold``): the data keys of
    ``TrainConfig``, whose docstring says what each means."""

    data: str | None
    demo_root: str
    layout: str
    contrast: str
    seg_name: str
    mask_name: str | None
    labels: str
    drop_labels: tuple[str, ...]
    merge_labels: tuple[str, ...]
    grid: tuple[int, int, int] | None
    voxel_mm: float | None
    margin: int
    fold: int
    val_subject: str | None
    test_mask: str
    subject_shares: int | None


@dataclasses.dataclass(frozen=True)
class InitConfig:
    """The network a fold starts from (``fold.prepare_fold``): initial weights, the width of a random
    init, dropout, how many last layers get new weights, and the requested input normalisation (resolved
    against the initial checkpoint's)."""

    weights: str | None
    n_filters: int
    dropout: bool
    last_layer: int
    normalization: str

    @property
    def dropout_rate(self) -> float:
        """The network's dropout rate: the original's (``ModelConfig.dropout_rate``) when dropout, else 0."""
        return ModelConfig.dropout_rate if self.dropout else 0.0


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
    """How a fold computes, not what (``sharding``, ``streamed``, ``memory``, ``distributed``): the keys a
    ``--resume`` may change (``runguard.PERFORMANCE_KEYS``). slab_rows None = automatic from the grid."""

    mesh: str | None
    remat: bool
    precision: str
    slab_rows: int | None
    distributed: bool


@dataclasses.dataclass(frozen=True)
class OutputConfig:
    """What the fold's test prediction and report give (``finetune``, ``results_page``): the test-time
    mirroring, the probability-map class, the surface classes."""

    tta: str
    prob_class: str | None
    surface_classes: tuple[str, ...] | None


class PhaseConfig(typing.NamedTuple):
    """One optimizer phase of ``TrainConfig`` (``TrainConfig.phase``): Adam learning rate, max epochs."""

    lr: float
    epochs: int
