"""Multi-process runs on 127.0.0.1: real processes, CPU backend, 2 CPU devices each, gloo collectives.

Every subprocess has a timeout (a hang fails the test). The reference results come from this pytest
process (4 virtual CPU devices, conftest.py) or, where they need a compile, from one child process
with 4 devices launched beside the others.

Cost: compiling is what these tests spend their time on (the model is tiny), so the children
(``process_env``) compile with LLVM's optimisation off (a third of the compile time on CPU; results
differ from optimised code by float rounding only) and share one persistent JAX compilation cache per
test module (a later launch of the same programs loads them). Not used: ``jax_share_binary_between_hosts``
(one process compiles for all) left the other process waiting in a gloo context that never formed.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import dist_worker
import jax
import numpy as np
import pytest
from tolerances import assert_first_updates_close, assert_leaves_close, dice_flip_bound

from cerebrum_jax.errors import InputError
from cerebrum_jax.parallel import distributed
from cerebrum_jax.parallel import sharding as S

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 400  # seconds for a whole 2-process run on a loaded 2-core machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory) -> Path:
    """One persistent compilation cache for every child process of this module."""
    return tmp_path_factory.mktemp("jax-cache")


def process_env(cache: Path, devices: int = 2) -> dict:
    """This environment for a child process with ``devices`` CPU devices (not conftest's 4), the repo
    importable, unoptimised compiles and the module's compilation cache (see the module docstring)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(
        JAX_PLATFORMS="cpu",
        JAX_NUM_CPU_DEVICES=str(devices),
        PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'tests'}",
        XLA_FLAGS="--xla_backend_optimization_level=0",
        JAX_COMPILATION_CACHE_DIR=str(cache),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    )
    return env


def start(argvs: list[list[str]], cwd, logs: Path, cache: Path, devices: int = 2) -> list[subprocess.Popen]:
    """One process per argv, stdout+stderr to logs/p-I.txt."""
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    for i, argv in enumerate(argvs):
        out = open(logs / f"p-{i}.txt", "w")  # noqa: SIM115 - closed with the process below
        env = process_env(cache, devices)
        procs.append(subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT))
        out.close()
    return procs


def finish(procs: list[subprocess.Popen], timeout: float = TIMEOUT) -> list[int]:
    """Exit statuses; a process still running after ``timeout`` is killed and fails the test."""
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=timeout))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"process {p.args} still running after {timeout} s: a hang")
    return codes


def test_launch_options_checked():
    with pytest.raises(InputError, match="--num-processes, --process-id"):
        distributed.initialize(
            argparse.Namespace(coordinator="127.0.0.1:1", num_processes=None, process_id=None)
        )
    bad = argparse.Namespace(
        coordinator="h:1", num_processes=2, process_id=2, init_timeout=1, heartbeat_timeout=1
    )
    with pytest.raises(InputError, match="0..1"):
        distributed.initialize(bad)
    assert not distributed.is_running() and distributed.is_main() and distributed.log_name() == "log.txt"
    assert distributed.share(list("abcde"), 1, 2) == ["b", "d"]
    assert distributed.share(list("abcde"), 0, 2) == ["a", "c", "e"]


@pytest.mark.slow
def test_kubernetes_launch_options_without_a_cluster(tmp_path):
    """An Indexed Job's pod index is the process id of an explicit launch (an explicit --process-id wins;
    a bad index is one line); where JAX finds no cluster on Kubernetes (no kubernetes package here) a
    real process exits 2 with one line saying what JAX needs or what to give instead."""
    ns = argparse.Namespace(coordinator="job-0.job:1234", num_processes=4, process_id=None)
    k8s = {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "JOB_COMPLETION_INDEX": "3"}
    assert distributed.launch_options(ns, k8s)["process_id"] == 3
    assert distributed.launch_options(ns, {})["process_id"] is None
    assert (
        distributed.launch_options(argparse.Namespace(coordinator="h:1", process_id=1), k8s)["process_id"]
        == 1
    )
    with pytest.raises(InputError, match="JOB_COMPLETION_INDEX='x' is not an integer"):
        distributed.launch_options(ns, {"JOB_COMPLETION_INDEX": "x"})
    assert "jax[k8s]" in distributed.launch_hint(k8s) and "jax[k8s]" not in distributed.launch_hint({})
    env = {**process_env(tmp_path / "cache"), **k8s}
    argv = [sys.executable, "-m", "cerebrum_jax", "segment", "in.nii.gz", "--weights", "w", "--out", "o"]
    argv.append("--distributed")
    r = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    lines = [x for x in r.stderr.splitlines() if x.startswith("cerebrum-jax")]
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
    assert "cannot start the distributed run" in lines[0] and "JOB_COMPLETION_INDEX" in lines[0]


def test_last_batch_must_split_over_the_data_axis():
    from cerebrum_jax.experiment.fold import check_last_batch

    check_last_batch(4, 2, 2)  # two whole batches
    check_last_batch(6, 4, 2)  # 4 + a short batch of 2
    with pytest.raises(InputError, match="last batch of each epoch has 1 of 3 views"):
        check_last_batch(3, 2, 2)


def test_local_bounds_and_from_local_on_one_process():
    mesh = S.make_mesh("1x4")
    vol = S.volume_sharding(mesh)
    x = np.arange(2 * 32 * 2 * 2, dtype=np.float32).reshape(2, 32, 2, 2, 1)[:1]
    assert distributed.local_bounds(x.shape, vol)[1] == slice(0, 32)  # one process holds everything
    g = distributed.from_local(x, vol, x.shape)
    assert g.sharding == vol and np.array_equal(distributed.gather(g), x)
    assert np.array_equal(distributed.gather(distributed.to_global(x, vol)), x)


@pytest.mark.slow
def test_two_processes_equal_one_process_with_four_devices(tmp_path, jax_cache):
    """One launch of 2 processes x 2 CPU devices. On a global 1x4 mesh, a sharded forward and training step,
    each process handing JAX only its own depth slab, equal one process's 4-device run (a third child,
    launched beside them). On a 2x2 mesh ("data" across the processes) each puts only its batch row, and
    the whole batch comes back."""
    params, batch, cfg = dist_worker.reference_problem()
    (tmp_path / "problem.pkl").write_bytes(pickle.dumps((params, batch, cfg)))
    port, worker = free_port(), str(REPO / "tests" / "dist_worker.py")
    argvs = [[sys.executable, worker, str(port), str(i), "2", "problem.pkl", str(tmp_path)] for i in range(2)]
    procs = start(argvs, tmp_path, tmp_path / "logs", jax_cache)
    reference = [[sys.executable, worker, "0", "0", "1", "problem.pkl", str(tmp_path)]]
    procs += start(reference, tmp_path, tmp_path / "logs-one", jax_cache, devices=4)
    codes = finish(procs)
    logs = [(tmp_path / name / "p-0.txt").read_text() for name in ("logs", "logs-one")]
    assert codes == [0, 0, 0], logs + [(tmp_path / "logs" / "p-1.txt").read_text()]
    got = [np.load(tmp_path / f"result-{i}.npz") for i in range(2)]
    want = np.load(tmp_path / "reference.npz")
    assert int(got[0]["devices"]) == 4 and int(want["devices"]) == 4
    for i in range(2):  # what each process handed JAX: its depth half on 1x4, its row on 2x2
        assert got[i]["part_1x4"].tolist() == [1, 16, 8, 8, 1]
        assert got[i]["rows_2x2"].tolist() == [i, i + 1] and got[i]["part_2x2"].tolist() == [1, 32, 8, 8, 1]
        np.testing.assert_array_equal(got[i]["image_2x2"], batch["image"])  # the other row came across
    assert want["part_1x4"].tolist() == [1, 32, 8, 8, 1]  # one process hands JAX the whole batch
    got = got[0]
    np.testing.assert_allclose(got["probs"], want["probs"], atol=2e-5)
    # process 1's half mattered: without it (zeros there) the probabilities in process 0's half differ
    assert np.abs(want["alone"][:, :16] - got["probs"][:, :16]).max() > 1e-3
    assert float(got["loss"]) == pytest.approx(float(want["loss"]), rel=1e-5)
    # the step's gradients (Adam's first moment, 0.1 g) leafwise at 1e-5 of each leaf's scale, and its
    # update (new - old parameters) within what that allows Adam's first update, lr g / (|g| + eps),
    # which is ill-conditioned near g = 0 (tolerances.adam_update_bound): not an absolute 1e-5, which
    # a gradient of 1.6e-9 nearly used up at lr 1e-2
    treedef = jax.tree_util.tree_structure(params)

    def tree(result, name):  # the leaves saved as NAME0, NAME1, ... in the parameters' structure
        return treedef.unflatten([result[f"{name}{i}"] for i in range(treedef.num_leaves)])

    def update(result):  # new - old parameters
        return jax.tree_util.tree_map(lambda n, p: np.asarray(n, np.float64) - p, tree(result, "p"), params)

    mu = tree(want, "mu")
    assert_leaves_close(mu, tree(got, "mu"), 1e-5)
    assert_first_updates_close(mu, tree(want, "p"), update(got), update(want), 1e-5, dist_worker.LR)


def _fold_dataset(tmp_path, n: int = 2) -> Path:
    """``n`` subjects of 16x16x16 (depth 16: 2 slabs per process on a 2x2 mesh)."""
    from test_finetune import _subject

    root = tmp_path / "data"
    for i in range(n):
        _subject(root, f"sub-{i + 1:03d}", i, shape=(16, 16, 16))
    return root


def _finetune_argv(root, out, *extra) -> list[str]:
    """finetune from scratch (a tiny network: one phase, one training step to compile) on a 2x2 mesh with
    batches of 2 views of the one training subject: "data" spans the two processes (each augments its
    own view), "space" their two devices."""
    return [
        sys.executable,
        *("-m", "cerebrum_jax", "finetune", "--config", "demo", "--data", str(root), "--weights", "none"),
        *("--out", str(out), "--grid", "16,16,16", "--augment-views", "2", "--batch-size", "2"),
        *("--no-progress", "--set", "dropout=false", "--set", "n_filters=2", "--mesh", "2x2"),
        *extra,
    ]


def _launch_finetune(tmp_path, argv, name, cache):
    port = free_port()
    argvs = [
        [*argv, "--distributed", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2"]
        + ["--process-id", str(i), "--heartbeat-timeout", "20"]
        for i in range(2)
    ]
    return start(argvs, tmp_path, tmp_path / name, cache)


def _files(run: Path) -> set[str]:
    """Paths under ``run`` except inside the Orbax state directories of checkpoints/best and last (file
    names there are random; checkpoints/last's state is written by every process)."""

    def in_state(p: Path) -> bool:
        return any(q.name == "state" and q.parent.parent.name == "checkpoints" for q in p.parents)

    return {str(p.relative_to(run)) for p in run.rglob("*") if p.is_file() and not in_state(p)}


def _history(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


PROB_TOL = 5e-4  # of the test subject's probabilities, 2 processes vs 1 (see below)


def _assert_same_test_segmentation(multi: Path, one: Path, subject: str) -> float:
    """The test subject's predictions of two runs of a fold (2 processes, 1 process), as far as float
    rounding lets them agree, and the bound their mean Dice difference must keep (returned, 0 when the
    label volumes are equal).

    Probabilities: within PROB_TOL, the losses' scale after updates (rel 1e-3, see there) halved, so
    that a near tie below is a margin of at most 1e-3 (seen: delta <= 7e-7, a few ulp, on a Xeon).
    Labels (the argmax of those probabilities): equal wherever the 1-process top-2 margin exceeds twice
    the largest probability difference delta, where neither run's argmax can differ (the smallest
    margin seen: 1e-4). Mean Dice: each voxel that took another class may move a class's Dice by
    tolerances.dice_flip_bound (its predicted + reference voxels from metrics.json); none: equal."""
    import nibabel as nib

    def prediction(run, kind):
        path = run / "predictions" / f"{subject}_space-orig_desc-cerebrum_{kind}.nii.gz"
        return np.asarray(nib.load(path).dataobj)

    probs, labels = (
        [prediction(r, "probseg") for r in (multi, one)],
        [prediction(r, "dseg") for r in (multi, one)],
    )
    delta = float(np.max(np.abs(probs[0] - probs[1])))
    assert delta <= PROB_TOL, delta
    top2 = np.sort(probs[1], axis=-1)[..., -2:]
    flipped = labels[0] != labels[1]
    assert not np.any(flipped & (top2[..., 1] - top2[..., 0] > 2 * delta)), (delta, int(flipped.sum()))
    m = [json.loads((r / "metrics.json").read_text()) for r in (multi, one)]
    scored = [[n for n, c in r["classes"].items() if c["label"] != 0 and not c["absent"]] for r in m]
    assert scored[0] == scored[1]
    totals = [m[1]["classes"][n]["voxels_pred"] + m[1]["classes"][n]["voxels_ref"] for n in scored[1]]
    bound = float(np.mean(dice_flip_bound(int(flipped.sum()), totals)))
    assert abs(m[0]["mean_dice"] - m[1]["mean_dice"]) <= bound + 1e-12, (m[0]["mean_dice"], m[1]["mean_dice"])
    return bound


@pytest.mark.slow
def test_finetune_all_folds_distributed_two_processes(tmp_path, jax_cache):
    """finetune --fold all --distributed (run_cv), 2 processes x 2 devices on a 2x2 mesh, 3 subjects, 1
    epoch, voxelwise normalisation, an automatic grid: process 0 wrote the run directory, process 1
    nothing but its logs (and its part of the Orbax checkpoints/last); each process read, augmented and
    validated only its own training subject (2 subject shares, one per process: the batch row its
    devices hold) and handed JAX only its own batch row; the grid, the normalisation volumes, the class
    weights and the validation metrics combined across the processes; every fold's metrics and the
    summary equal one process with 4 devices and --subject-shares 2."""
    root = _fold_dataset(tmp_path, 3)
    extra = ("--epochs", "1", "--fold", "all", "--grid", "auto", "--set", "normalization=voxelwise")
    procs = _launch_finetune(tmp_path, _finetune_argv(root, tmp_path / "multi", *extra), "logs", jax_cache)
    one = _finetune_argv(root, tmp_path / "one", *extra, "--subject-shares", "2")
    procs += start([one], tmp_path, tmp_path / "logs-one", jax_cache, devices=4)
    codes = finish(procs)
    out = [(tmp_path / name / "p-0.txt").read_text() for name in ("logs", "logs", "logs-one")]
    out[1] = (tmp_path / "logs" / "p-1.txt").read_text()
    assert codes == [0, 0, 0], out
    assert "cross-validation: mean Dice" in out[0] and "mean Dice" not in out[1]
    multi, one = tmp_path / "multi", tmp_path / "one"
    assert _files(multi) == _files(one) | {f"fold-{k}/log.process-1.txt" for k in (1, 2, 3)}
    bounds = []  # of each fold's mean-Dice difference
    for k, (mine, theirs) in {
        1: ("sub-003", "sub-002"),
        2: ("sub-003", "sub-001"),
        3: ("sub-002", "sub-001"),
    }.items():
        log1 = (multi / f"fold-{k}" / "log.process-1.txt").read_text()
        assert "process 1 of 2, 2 local / 4 global devices" in log1
        assert "batches (2, 16, 16, 16): this process augments rows 1:2 and hands JAX depth 0:16" in log1
        assert f"this process reads training subjects ['{mine}'] and validates ['{mine}']" in log1
        assert (
            f"reads training subjects ['{theirs}'] and validates ['{theirs}']"
            in (multi / f"fold-{k}" / "log.txt").read_text()
        )
        hist = [_history(r / f"fold-{k}") for r in (multi, one)]
        assert [h["phase"] for h in hist[0]] == ["finetune"]
        # Each process augments its own row alone, the one process both rows in one batch: the images
        # differ by an ulp and a nearest-neighbour label at a rounding tie may take the other voxel's
        # class. One flipped label moves the soft-Dice term ~5e-4 (~1e-4 of the loss), and the epoch's
        # updates, and so the validation after them, take what Adam makes of that (up to a whole step,
        # lr 1e-3, for an element whose gradient is near zero: tolerances.adam_update_bound): rel 1e-3.
        for a, b in zip(*hist, strict=True):
            assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-3)
            assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-3)
        bounds.append(_assert_same_test_segmentation(multi / f"fold-{k}", one / f"fold-{k}", f"sub-00{k}"))
    config = json.loads((multi / "fold-1" / "config.json").read_text())
    assert config["mesh"] == {"data": 2, "space": 2} and len(config["devices"]) == 4
    assert config["subject_shares"] == 2 and config["config"]["subject_shares"] is None  # automatic
    assert config["grid"] == json.loads((one / "fold-1" / "config.json").read_text())["grid"] == [16] * 3
    assert "sub-002, sub-003 (in 2 subject shares)" in (multi / "fold-1" / "report.md").read_text()
    summary = [json.loads((r / "cv_summary.json").read_text()) for r in (multi, one)]
    # the mean over the folds of their mean Dice: within the mean of the folds' bounds (0: equal)
    assert abs(summary[0]["mean_dice"]["mean"] - summary[1]["mean_dice"]["mean"]) <= np.mean(bounds) + 1e-12


@pytest.mark.slow
def test_a_bad_file_in_one_process_share_stops_both_with_status_2(tmp_path, jax_cache):
    """Subject shares: sub-003 is read by process 1 only (fold 1); its corrupt image is one line naming
    it there, the other process says which process failed, both exit 2 and nothing is written."""
    root = _fold_dataset(tmp_path, 3)
    image = next((root / "derivatives" / "sub-003").rglob("*_uni_unbiased.nii.gz"))
    image.write_bytes(b"not a nifti")
    argv = _finetune_argv(root, tmp_path / "run", "--epochs", "1", "--fold", "1")
    codes = finish(_launch_finetune(tmp_path, argv, "logs", jax_cache))
    text = [(tmp_path / "logs" / f"p-{i}.txt").read_text() for i in range(2)]
    errors = [[x for x in t.splitlines() if "error:" in x] for t in text]
    assert codes == [2, 2], text
    assert len(errors[1]) == 1 and "process 1 of 2" in errors[1][0] and str(image) in errors[1][0], text[1]
    assert len(errors[0]) == 1 and "the input check failed on process(es) [1]" in errors[0][0], text[0]
    assert "Traceback" not in text[0] + text[1] and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_dead_process_stops_the_other_and_the_run_resumes(tmp_path, jax_cache):
    """SIGKILL process 1 after epoch 2: process 0 exits with an error within the heartbeat timeout. The
    2-process checkpoints/last then resumes in one process with 4 devices, which warns that its automatic
    subject shares (1: one process) differ from the 2 of the 2-process run."""
    import time

    root = _fold_dataset(tmp_path, 3)
    run = tmp_path / "run"
    argv = _finetune_argv(root, run, "--epochs", "4", "--fold", "2")  # --resume: the same config
    procs = _launch_finetune(tmp_path, argv, "logs", jax_cache)
    log1 = run / "fold-2" / "log.process-1.txt"
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline and "finetune epoch 2:" not in (
        log1.read_text() if log1.exists() else ""
    ):
        assert procs[0].poll() is None and procs[1].poll() is None, "a process ended before the kill"
        time.sleep(0.05)
    procs[1].kill()
    killed = time.monotonic()
    codes = finish(procs[:1], timeout=120)  # heartbeat timeout 20 s, with room for a loaded machine
    took = time.monotonic() - killed
    procs[1].wait(timeout=10)
    text = (tmp_path / "logs" / "p-0.txt").read_text()
    assert codes[0] != 0 and took < 120, (codes, took)
    assert "error: process 0 of 2: lost another process" in text or "another task died" in text, text[-2000:]
    assert not (run / "fold-2" / "metrics.json").exists()

    codes = finish(start([[*argv, "--resume"]], tmp_path, tmp_path / "logs-resume", jax_cache, devices=4))
    assert codes == [0], (tmp_path / "logs-resume" / "p-0.txt").read_text()[-3000:]
    log = (run / "fold-2" / "log.txt").read_text()
    assert "resuming at phase finetune, epoch 3" in log or "resuming at phase finetune, epoch 2" in log
    assert "warning: 1 subject share(s) now, 2 before" in log and "--subject-shares 2 keeps them" in log
    assert json.loads((run / "fold-2" / "metrics.json").read_text())["epochs"]["finetune"] == 4


@pytest.mark.slow
def test_segment_distributed_splits_the_inputs(tmp_path, jax_cache):
    """segment --distributed, 2 processes, 3 inputs: process 0 segments inputs 1 and 3, process 1 input 2,
    each on its own 2 devices (--mesh 1x2); the files equal a single-process segmentation."""
    import nibabel as nib

    from cerebrum_jax.model import checkpoint
    from cerebrum_jax.model.network import ModelConfig
    from cerebrum_jax.predict.segment import segment

    cfg = ModelConfig(n_filters=2, n_classes=3)
    params = dist_worker.tiny_params(cfg, 5)
    checkpoint.save_checkpoint(tmp_path / "w", params, cfg)
    rng = np.random.default_rng(0)
    inputs = []
    for i in range(3):
        inputs.append(tmp_path / f"sub-{i}_T1w.nii.gz")
        nib.save(nib.Nifti1Image(rng.normal(size=(16, 16, 16)).astype(np.float32), np.eye(4)), inputs[-1])
    port, out = free_port(), tmp_path / "out"
    argvs = [
        [sys.executable, "-m", "cerebrum_jax", "segment", *map(str, inputs), "--weights", str(tmp_path / "w")]
        + ["--out", str(out), "--mesh", "1x2", "--distributed", "--coordinator", f"127.0.0.1:{port}"]
        + ["--num-processes", "2", "--process-id", str(i), "--heartbeat-timeout", "20"]
        for i in range(2)
    ]
    procs = start(argvs, tmp_path, tmp_path / "logs", jax_cache)
    want = [segment(np.asarray(nib.load(path).dataobj, np.float32), params, cfg) for path in inputs]
    codes = finish(procs)
    text = [(tmp_path / "logs" / f"p-{i}.txt").read_text() for i in range(2)]
    assert codes == [0, 0], text
    assert "sub-0_T1w" in text[0] and "sub-2_T1w" in text[0] and "sub-1_T1w.nii.gz:" not in text[0]
    assert "sub-1_T1w.nii.gz:" in text[1] and "sub-0_T1w.nii.gz:" not in text[1]
    assert "1 of 3 inputs" in text[1] and "mesh 1x2" in text[1]
    assert (out / "dseg.tsv").read_text().startswith("index\tname\n")
    for path, expected in zip(inputs, want, strict=True):
        stem = path.name.removesuffix("_T1w.nii.gz") + "_space-orig"  # BIDS derivative names
        got = np.asarray(nib.load(out / f"{stem}_desc-cerebrum_probseg.nii.gz").dataobj)
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_cv_summary_command_from_fold_directories(tmp_path, capsys):
    """cv-summary RUN_DIR: the summary of the finished folds (an unfinished one is named and left out);
    bad or missing metrics exit 2 with one line and write nothing."""
    from cerebrum_jax.cli import main

    def fold(k, dice):
        d = tmp_path / "run" / f"fold-{k}"
        d.mkdir(parents=True)
        classes = {"wm": {"dice": dice, "hd95_mm": 1.0 + k, "vs": 0.9}}
        (d / "metrics.json").write_text(json.dumps({"fold": k, "classes": classes, "mean_dice": dice}))

    run = tmp_path / "run"
    assert main(["cv-summary", str(run)]) == 2  # no directory yet
    assert "is not a directory" in capsys.readouterr().err
    fold(1, 0.8)
    fold(10, 0.6)
    (run / "fold-2").mkdir()  # still running
    (run / "notes").mkdir()
    assert main(["cv-summary", str(run), "--expect", "3"]) == 2
    assert "2 finished fold(s), --expect 3" in capsys.readouterr().err
    assert not (run / "cv_summary.json").exists()
    assert main(["cv-summary", str(run)]) == 0
    captured = capsys.readouterr()
    assert "fold-2" in captured.err and "[1, 10]" in captured.out
    summary = json.loads((run / "cv_summary.json").read_text())
    assert summary["folds"] == [1, 10] and summary["mean_dice"]["mean"] == pytest.approx(0.7)
    assert summary["mean_dice"]["sd"] == pytest.approx(np.std([0.8, 0.6], ddof=1))
    assert "mean Dice" in (run / "cv_summary.md").read_text()
    (run / "fold-2" / "metrics.json").write_text("{")
    assert main(["cv-summary", str(run)]) == 2
    err = capsys.readouterr().err
    assert "fold-2/metrics.json" in err and len(err.strip().splitlines()) == 1
