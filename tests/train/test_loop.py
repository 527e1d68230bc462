"""The epoch loop called directly: in memory with no hooks, the order of its hooks, and a run directory
interrupted and resumed through ``runhooks.RunDirHooks`` giving the uninterrupted run's results."""

import json

import jax
import numpy as np
import pytest

from cerebrum_jax.experiment.config import LoopConfig
from cerebrum_jax.experiment.rundir import RunDir
from cerebrum_jax.experiment.runhooks import RunDirHooks
from cerebrum_jax.model import checkpoint
from cerebrum_jax.model.network import ModelConfig, init_params
from cerebrum_jax.train import loop
from cerebrum_jax.train.augment import AugmentConfig
from cerebrum_jax.train.losses import LossConfig

SHAPE = (16, 16, 16)
MODEL = ModelConfig(n_filters=2, n_classes=3)
LOSS = LossConfig("ce+dice", "balanced")


def _volumes(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        labels = np.zeros(SHAPE, np.int32)
        labels[4:12, 4:12, 4:12] = 1
        labels[6:10, 6:10, 6:10] = 2
        image = (labels * 1.0 + rng.normal(0, 0.3, SHAPE)).astype(np.float32)
        out.append((image, labels))
    return out


def _phases(params, epochs=(1, 2)):
    unfrozen = jax.tree_util.tree_map(lambda _: False, params)
    frozen = {
        k: jax.tree_util.tree_map(lambda _, new=k == "main_output": not new, v) for k, v in params.items()
    }
    return [loop.Phase("warmup", 1e-3, epochs[0], frozen), loop.Phase("finetune", 1e-3, epochs[1], unfrozen)]


class Recorder(loop.Hooks):
    def __init__(self):
        self.calls = []

    def phase_start(self, phase, n_steps, first_epoch):
        self.calls.append(("phase_start", phase.name, n_steps, first_epoch))

    def step_end(self, phase, epoch, loss):
        self.calls.append(("step", phase.name, epoch))

    def improved(self, params, record):
        self.calls.append(("improved", record["phase"], record["epoch"]))

    def epoch_end(self, end):
        self.calls.append(("epoch_end", end.record["phase"], end.record["epoch"], end.position()["phase"]))

    def phase_end(self, phase, stopped, best_loss):
        self.calls.append(("phase_end", phase.name, stopped))

    def close(self):
        self.calls.append(("close",))


SCHEDULE = LoopConfig(augment_views=1, seed=0)


def _fit(hooks=(), epochs=(1, 2), schedule=SCHEDULE):
    params = init_params(MODEL, jax.random.key(1))
    train, val = _volumes(2), _volumes(1, seed=9)
    return loop.fit(
        schedule, LOSS, AugmentConfig(), MODEL, params, _phases(params, epochs), train, val, hooks=hooks
    )


def _without_seconds(history):
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


@pytest.mark.slow
def test_fit_in_memory_writes_nothing_and_calls_its_hooks_in_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recorder = Recorder()
    params, history = _fit([recorder])
    assert list(tmp_path.iterdir()) == []  # the loop itself writes no file
    assert [(h["phase"], h["epoch"]) for h in history] == [("warmup", 1), ("finetune", 1), ("finetune", 2)]
    assert all(np.isfinite(h["val_loss"]) for h in history)
    names = [c[0] for c in recorder.calls]
    assert names[0] == "phase_start" and names[-1] == "close"
    assert names.count("step") == 3 * 2  # 2 volumes x 1 view, batch 1, 3 epochs
    assert [c for c in recorder.calls if c[0] == "epoch_end"] == [
        ("epoch_end", "warmup", 1, 1),  # the warm-up's only epoch ends its phase: resume at phase 1
        ("epoch_end", "finetune", 1, 1),
        ("epoch_end", "finetune", 2, 2),
    ]
    first_improved = names.index("improved")
    assert names[first_improved + 1] == "epoch_end"  # the best is saved before the epoch's end
    best_loss = min(h["val_loss"] for h in history)
    assert best_loss == min(h["val_loss"] for h in history if h["improved"])
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(
        init_params(MODEL, jax.random.key(1))
    )


@pytest.mark.slow
def test_same_seed_same_history():
    a, b = _fit(epochs=(0, 2))[1], _fit(epochs=(0, 2))[1]
    assert [h["phase"] for h in a] == ["finetune", "finetune"]
    assert _without_seconds(a) == _without_seconds(b)


class Interrupt(Exception):
    pass


class StopAfter(loop.Hooks):
    """Raises after the n-th epoch's hooks ran (a run killed between epochs)."""

    def __init__(self, n):
        self.n, self.seen = n, 0

    def epoch_end(self, end):
        self.seen += 1
        if self.seen == self.n:
            raise Interrupt


def _save_best(path, params, record):
    checkpoint.save_checkpoint(path, params, MODEL, meta={"best_epoch": record}, overwrite=True)


@pytest.mark.slow
@pytest.mark.parametrize("stop_after", [1, 2])  # at the end of the warm-up; in the middle of fine-tuning
def test_interrupted_and_resumed_run_directory_equals_the_uninterrupted_run(tmp_path, stop_after):
    whole = RunDir(tmp_path / "whole")
    params, history = _fit([RunDirHooks(whole, _save_best, log=lambda _: None)])
    assert whole.has_best() and whole.has_last()
    assert [json.loads(x) for x in whole.metrics_jsonl.read_text().splitlines()] == history
    cut = RunDir(tmp_path / "cut")
    with pytest.raises(Interrupt):
        _fit([RunDirHooks(cut, _save_best, log=lambda _: None), StopAfter(stop_after)])
    assert len(cut.metrics_jsonl.read_text().splitlines()) == stop_after
    lines = []
    resumed_params, resumed = _fit([RunDirHooks(cut, _save_best, resume=True, log=lines.append)])
    assert lines and lines[0].startswith("resuming at phase")
    assert _without_seconds(resumed) == _without_seconds(history)
    for x, y in zip(
        jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(resumed_params), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    best = checkpoint.load_checkpoint(cut.best)
    for x, y in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(best.params), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_run_dir_names_every_path(tmp_path):
    run = RunDir.fold(tmp_path, 3)
    assert run.root == tmp_path / "fold-3" and RunDir.fold_number(run.root) == 3
    assert RunDir.fold_number(tmp_path / "fold-x") is None and RunDir.fold_number(tmp_path / "x-3") is None
    assert run.best == run.root / "checkpoints" / "best" and run.loop_json == run.last / "loop.json"
    assert not run.has_best() and not run.has_last()


# (epoch, epochs, lr_hold, expected learning rate) of a phase at 1e-3 with min_lr 1e-5 under the cosine
# schedule; with lr_hold 0.5 of 8 epochs the first 4 keep 1e-3 and the cosine runs over the other 4
HALF = 1e-5 + 0.5 * (1e-3 - 1e-5)
COSINE = [(0, 4, 0, 1e-3), (2, 4, 0, HALF), (4, 4, 0, 1e-5), (1, 1, 0, 1e-5), (0, 1, 0, 1e-3)]
COSINE += [(3, 8, 0.5, 1e-3), (4, 8, 0.5, 1e-3), (6, 8, 0.5, HALF), (8, 8, 0.5, 1e-5), (0, 1, 0.5, 1e-3)]


@pytest.mark.parametrize("epoch, epochs, hold, expected", COSINE)
def test_cosine_learning_rate(epoch, epochs, hold, expected):
    schedule = LoopConfig(lr_schedule="cosine", min_lr=1e-5, lr_hold=hold)
    assert schedule.lr_at(1e-3, epoch, epochs) == pytest.approx(expected, rel=1e-12)
    assert LoopConfig(lr_schedule="plateau").lr_at(1e-3, epoch, epochs) is None


@pytest.mark.slow
def test_cosine_schedule_sets_each_epochs_rate_and_never_cuts_on_a_plateau():
    schedule = LoopConfig(augment_views=1, seed=0, lr_schedule="cosine", min_lr=1e-5, plateau_patience=0)
    _, history = _fit(epochs=(0, 3), schedule=schedule)
    assert [h["lr"] for h in history] == pytest.approx(
        [schedule.lr_at(1e-3, e, 3) for e in range(3)], rel=1e-6
    )
    assert not any(h["lr_reduced"] for h in history)  # plateau_patience 0 would cut every epoch otherwise


@pytest.mark.slow
def test_fit_with_skeleton_recall_and_synthetic_intensities():
    """The loop computes the tubed skeletons, carries them through the views and adds their recall
    to the training and validation loss; the same seed gives the same history."""
    params = init_params(MODEL, jax.random.key(1))
    train, val = _volumes(2), _volumes(1, seed=9)
    loss = LossConfig("ce+dice", "balanced", skeleton_classes=(2,), skeleton_weight=1.0)
    augment = AugmentConfig(synth=True, p_synth=0.5)

    def run(loss_config):
        return loop.fit(SCHEDULE, loss_config, augment, MODEL, params, _phases(params, (0, 2)), train, val)[1]

    with_skeleton, again, without = run(loss), run(loss), run(LOSS)
    assert _without_seconds(with_skeleton) == _without_seconds(again)
    assert [h["train_loss"] for h in with_skeleton] != [h["train_loss"] for h in without]
    data = loop._device_data(train, val, 3, None, loop.Shares.single(2, 1), None, loss)
    assert data.skeletons.shape == (2, *SHAPE) and int(data.skeletons.sum()) > 0
    assert np.all(np.asarray(train[0][1])[np.asarray(data.skeletons[0]) == 1] == 2)  # class 2's centre
    metrics = jax.jit(loop.make_eval_step(MODEL, loss))(params, data.val[0])
    plain = jax.jit(loop.make_eval_step(MODEL, LOSS))(params, data.val[0])
    assert 0 < float(metrics["skeleton_loss"]) <= 1  # the validation loss has the term too
    np.testing.assert_allclose(metrics["loss"], plain["loss"] + metrics["skeleton_loss"], rtol=1e-5)
