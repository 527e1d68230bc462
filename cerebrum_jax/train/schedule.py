"""The epoch loop's schedule: ``LoopConfig``, a plain frozen dataclass (no JAX), read by ``loop.fit`` and
built by ``experiment.config.TrainConfig.loop`` (or directly, by a caller without an experiment config)."""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """The epoch loop's schedule (``loop.fit``), a section of ``TrainConfig`` (``TrainConfig.loop``) that a
    caller without an experiment config (``experiments/pretrain_demo.py``) builds directly. Defaults: the
    original's (Svanera et al., Human Brain Mapping 2021; github.com/rockNroll87q/cerebrum7t).

    batch_size (views per step), augment_views (random views per training volume per epoch; 0 = the
    volumes as they are), patience (early stopping, epochs), lr_schedule ("plateau": the original's
    reduce-on-plateau by plateau_factor after plateau_patience epochs, down to min_lr; "cosine": each
    phase's learning rate from its lr down to min_lr over its epochs on a half cosine, no plateau cuts),
    lr_hold (cosine: the share of each phase's epochs, 0..1, held at its lr before the half cosine over the
    rest), seed (augmentation, dropout, order), slab_rows (depth slabs of the full-resolution layers,
    ``streamed``; 0 = the plain whole-volume step).
    """

    batch_size: int = 1
    augment_views: int = 30
    patience: int = 10
    plateau_factor: float = 0.25
    plateau_patience: int = 5
    min_lr: float = 1e-7
    seed: int = 0
    slab_rows: int = 0
    lr_schedule: str = "plateau"
    lr_hold: float = 0.0

    def lr_at(self, lr: float, epoch: int, epochs: int) -> float | None:
        """The learning rate of ``epoch`` (0-based) of a phase of ``epochs`` that starts at ``lr`` under
        the cosine schedule (``lr_schedule`` "cosine": ``lr`` for the first ``lr_hold`` of the epochs, then
        a half cosine down to min_lr over the rest); None under "plateau" (the controller's)."""
        if self.lr_schedule != "cosine":
            return None
        hold = round(self.lr_hold * epochs)
        if epoch < hold:
            return lr
        t = (epoch - hold) / max(epochs - hold, 1)
        return self.min_lr + 0.5 * (lr - self.min_lr) * (1.0 + math.cos(math.pi * t))

    @property
    def views_per_volume(self) -> int:
        """Views of each training volume per epoch: augment_views, or 1 (the volume as it is) for 0."""
        return max(self.augment_views, 1)
