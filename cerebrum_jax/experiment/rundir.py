"""A fine-tuning run directory: every path in it, named once (``RunDir``), and the record of the run
(``RunRecord``) that config.json, metrics.json and the reports are written from. No jax here: the light
modules (``runguard``, ``runlog``) use it too; ``runhooks`` writes the checkpoints and metrics.jsonl.

Layout of RUN (one fold; ``RunDir.fold(out, k)`` is OUT/fold-K of a cross-validation):

    config.json  log.txt  dseg.tsv  metrics.jsonl  metrics.json  report.md  figures/  predictions/
    checkpoints/best/   the best model so far: a ``checkpoint`` directory (cerebrum.json with its sha256s),
                        what ``segment --weights RUN/checkpoints/best`` loads
    checkpoints/last/   state/ (Orbax: params, optimizer state, step) + loop.json (loop position, history,
                        best val loss, state/'s sha256), what ``--resume`` goes on from
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import NamedTuple

FOLD_PREFIX = "fold-"
LOOP_JSON = "loop.json"  # in checkpoints/last, beside STATE
STATE = "state"


class RunDir(NamedTuple):
    """The paths of one fold's run directory ``root`` (see the module docstring)."""

    root: Path

    @classmethod
    def fold(cls, out, k: int) -> RunDir:
        """OUT/fold-K: fold ``k`` of a cross-validation (``cli finetune --out OUT``)."""
        return cls(Path(out) / f"{FOLD_PREFIX}{k}")

    @staticmethod
    def fold_number(path) -> int | None:
        """K of a directory named fold-K (None for any other name)."""
        name = Path(path).name
        suffix = name.removeprefix(FOLD_PREFIX)
        return int(suffix) if name.startswith(FOLD_PREFIX) and suffix.isdigit() else None

    @property
    def config_json(self) -> Path:
        return self.root / "config.json"

    @property
    def metrics_jsonl(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def metrics_json(self) -> Path:
        return self.root / "metrics.json"

    @property
    def dseg_tsv(self) -> Path:
        return self.root / "dseg.tsv"

    @property
    def report_md(self) -> Path:
        return self.root / "report.md"

    @property
    def predictions(self) -> Path:
        return self.root / "predictions"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def best(self) -> Path:
        return self.checkpoints / "best"

    @property
    def last(self) -> Path:
        return self.checkpoints / "last"

    @property
    def loop_json(self) -> Path:
        return self.last / LOOP_JSON

    @property
    def last_state(self) -> Path:
        return self.last / STATE

    def has_best(self) -> bool:
        return (self.best / "cerebrum.json").is_file()

    def has_last(self) -> bool:
        return self.loop_json.is_file()


# ----------------------------------------------------------------------------------------------------------
# The record of a run: one set of facts for config.json, metrics.json and the reports


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """What a fold ran with, built once (``finetune``) and written to config.json (``to_json``, in this
    field order), metrics.json (``metrics_fields``) and the reports (``report_rows``, and report.html
    from ``to_json``)."""

    config: dict
    fold: int
    seed: int
    git_commit: str | None
    data: str
    grid: list
    train_subjects: list
    val_subjects: list
    test_subject: str
    normalization: str
    normalization_note: str
    initial_weights: str
    initial_weights_note: str
    preprocessing: dict
    brain_mask: str
    model: dict
    copied_layers: list
    labels: str
    jax: str
    devices: list
    mesh: dict | None
    subject_shares: int = 1

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def metrics_fields(self) -> dict:
        """The facts metrics.json repeats beside the scores."""
        keys = ("fold", "test_subject", "normalization", "brain_mask", "initial_weights")
        return {**{k: getattr(self, k) for k in keys}, "initial_weights_note": self.initial_weights_note}

    def report_rows(self, normalization_words: str, mask_words: str, preprocessing_words: str) -> dict:
        """The run's rows of report.md (the epochs and timings are added by the caller)."""
        shares = f" (in {self.subject_shares} subject shares)" if self.subject_shares > 1 else ""
        return {
            "title": f"cerebrum-jax fine-tuning, fold {self.fold}",
            "fold": self.fold,
            "test subject": self.test_subject,
            "training subjects": ", ".join(self.train_subjects) + shares,
            "input normalisation": normalization_words,
            "brain mask (all subjects, the test subject too)": mask_words,
            "preprocessing": preprocessing_words,
            "initial weights": self.initial_weights,
            "initial weights note": self.initial_weights_note,
            "git commit": self.git_commit,
            "seed": self.seed,
        }
