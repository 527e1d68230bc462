"""No silent failures: bad inputs and faults through the real command line, each one line and exit status 2
(or a run that works), nothing half-written, no traceback. One case per defect of issue 8's probe."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import jax
import nibabel as nib
import numpy as np
import pytest
from failure_kit import (  # noqa: F401  (files: a fixture)
    CONFIG,
    REPO_ROOT,
    SHAPE,
    files,
    finetune_args,
    one_error_line,
    stored_run,
    tree,
)

from cerebrum_jax import fsafe
from cerebrum_jax.cli import build_parser, main
from cerebrum_jax.cli.finetune import resolve
from cerebrum_jax.errors import InputError
from cerebrum_jax.model import checkpoint
from cerebrum_jax.model import keras as convert
from cerebrum_jax.shipped import REPO

# ----------------------------------------------------------------------------------------------------------
# 1. one run at a time into an output directory


@pytest.fixture
def holder(tmp_path):
    """Start a real process holding the lock of a directory; yields (start(dir) -> pid)."""
    procs = []

    def start(directory: Path) -> int:
        code = (
            "import sys; from cerebrum_jax.fsafe import DirLock; lock = DirLock(sys.argv[1], 'test holder'); "
            "print('locked', flush=True); sys.stdin.read()"
        )
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        p = subprocess.Popen(
            [sys.executable, "-c", code, str(directory)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        procs.append(p)
        assert p.stdout.readline().strip() == b"locked"
        return p.pid

    yield start
    for p in procs:
        p.stdin.close()
        p.wait(timeout=60)


@pytest.mark.slow  # a second Python process importing jax
def test_two_runs_into_one_fold_directory(files, tmp_path, capsys, holder):
    run = tmp_path / "out" / "fold-1"
    pid = holder(run)
    before = tree(tmp_path / "out")
    err = one_error_line(capsys, main(finetune_args(files, tmp_path / "out")), "in use by another run")
    assert f"pid {pid} " in err and "test holder" in err and str(run) in err
    assert tree(tmp_path / "out") == before  # the holder's run is untouched


@pytest.mark.slow  # a second Python process importing jax
def test_two_segment_runs_into_one_out(files, tmp_path, capsys, holder):
    out = tmp_path / "seg"
    pid = holder(out)
    code = main(["segment", "--weights", str(files["ck"]), str(files["img"]), "--out", str(out)])
    assert f"pid {pid} " in one_error_line(capsys, code, "in use by another run")
    assert [p.name for p in out.iterdir()] == [fsafe.LOCK_NAME]


def test_lock_released_and_created_directories_removed(tmp_path):
    target = tmp_path / "a" / "b"
    with fsafe.DirLock(target, "x") as lock:
        assert json.loads(lock.file.read_text())["pid"] == os.getpid()
        with pytest.raises(InputError, match=f"pid {os.getpid()} "):
            fsafe.DirLock(target, "second")  # a second lock, even from the same process
        assert target.is_dir()
    assert not (tmp_path / "a").exists()  # created by the lock and left empty: removed
    target.mkdir(parents=True)
    (target / "keep").write_text("k")
    with fsafe.DirLock(target):
        pass
    assert [p.name for p in target.iterdir()] == ["keep"]


# ----------------------------------------------------------------------------------------------------------
# 2, 3, 10, 11: --resume continues the same run or refuses


def test_resume_with_another_config_names_the_keys(files, tmp_path, capsys):
    run = stored_run(files, tmp_path / "r", seed=7, loss="ce")
    before = tree(run)
    code = main(finetune_args(files, tmp_path / "r", "--resume"))
    err = one_error_line(capsys, code, "config.json: --resume with a config that differs")
    assert 'loss ("ce" -> "ce+dice")' in err
    assert "seed (7 -> 0)" in err and "mesh, remat, precision, slab_rows, distributed may change" in err
    assert tree(run) == before


def test_resume_performance_keys_may_differ(files, tmp_path):
    from cerebrum_jax.experiment import runguard

    run = stored_run(files, tmp_path / "r", precision="bf16", remat=True, mesh="1x4")
    cfg, _, _ = resolve(build_parser().parse_args(finetune_args(files, tmp_path / "r")))
    runguard.check_same_config(run / "config.json", cfg)  # no error
    assert runguard.config_differences({"a": 1, "mesh": None}, {"a": 2, "mesh": "1x4"}) == ["a"]


@pytest.mark.parametrize(
    "case,message",
    [
        ("log symlink", "log.txt: is a symbolic link"),
        ("loop garbage", "loop.json: corrupt loop.json (JSONDecodeError"),
        ("loop fields", "loop.json: corrupt loop.json: 'next_epoch' is 'x'"),
        ("config garbage", "config.json: corrupt config.json"),
        ("last state changed", "state/ is missing or does not match the sha256 in loop.json"),
    ],
)
def test_resume_refuses_a_broken_run_directory(files, tmp_path, capsys, case, message):
    run = stored_run(files, tmp_path / "r")
    outside = tmp_path / "elsewhere.txt"
    outside.write_text("not the run's\n")
    last = run / "checkpoints" / "last"
    loop = {"phase": 0, "next_epoch": 1, "controller": None, "best": 1.0, "history": []}
    if case == "log symlink":
        (run / "log.txt").unlink()
        (run / "log.txt").symlink_to(outside)
    elif case == "loop garbage":
        (last / "loop.json").write_text('{"phase": 0, "next_')
    elif case == "loop fields":
        (last / "loop.json").write_text(json.dumps({**loop, "next_epoch": "x"}))
    elif case == "config garbage":
        (run / "config.json").write_bytes(b"\xff\xfe{")
    else:
        (last / "state").mkdir()
        (last / "state" / "x").write_bytes(b"1")
        (last / "loop.json").write_text(json.dumps({**loop, "state_sha256": "0" * 64}))
    before = tree(run)
    one_error_line(capsys, main(finetune_args(files, tmp_path / "r", "--resume")), message)
    assert tree(run) == before and outside.read_text() == "not the run's\n"


@pytest.mark.slow  # prepares the fold (new layers' init) before the state is read
def test_resume_from_a_corrupt_last_state_with_its_digest(files, tmp_path, capsys):
    """A state/ Orbax cannot read, written so (its digest matches): one line, not Orbax's traceback."""
    run = stored_run(files, tmp_path / "r")
    last = run / "checkpoints" / "last"
    (last / "state").mkdir()
    (last / "state" / "_METADATA").write_text("{broken")
    controller = {"lr": 1e-3, "best": 1.0, "wait": 0, "plateau_best": 1.0, "plateau_wait": 0, "stop": False}
    loop = {"phase": 0, "next_epoch": 1, "controller": controller, "best": float("inf"), "history": []}
    loop["state_sha256"] = checkpoint.state_digest(last / "state")
    (last / "loop.json").write_text(json.dumps(loop))
    one_error_line(capsys, main(finetune_args(files, tmp_path / "r", "--resume")), "last: cannot restore (")


def test_resume_removes_leftovers_of_a_killed_save(files, tmp_path):
    from cerebrum_jax.experiment import runguard

    run = stored_run(files, tmp_path / "r")
    for name in (".last.k2j3h4", ".best.abc"):
        (run / "checkpoints" / name / "state").mkdir(parents=True)
    (run / ".metrics.jsonl.x1.tmp").write_text("half")
    cfg, _, _ = resolve(build_parser().parse_args(finetune_args(files, tmp_path / "r")))
    lines = []
    runguard.check_resume(run, cfg, log=lines.append)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last"]
    assert not (run / ".metrics.jsonl.x1.tmp").exists() and "leftover" in " ".join(lines)


# ----------------------------------------------------------------------------------------------------------
# 4. checkpoints: a flipped byte, non-finite parameters, old checkpoints without a digest


def _copy_checkpoint(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_checkpoint_with_one_flipped_byte_is_refused(files, tmp_path, capsys):
    ck = _copy_checkpoint(files["ck"], tmp_path / "ck")
    biggest = max((p for p in (ck / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(biggest.read_bytes())
    data[len(data) // 2] ^= 0x01
    biggest.write_bytes(bytes(data))
    out = tmp_path / "seg"
    code = main(["segment", "--weights", str(ck), str(files["img"]), "--out", str(out)])
    one_error_line(capsys, code, "does not match the sha256 recorded in cerebrum.json")
    assert not out.exists()


def test_checkpoint_without_digest_still_loads_and_nan_params_are_refused(files, tmp_path, capsys):
    ck = _copy_checkpoint(files["ck"], tmp_path / "old")
    meta = json.loads((ck / "cerebrum.json").read_text())
    assert len(meta.pop("state_sha256")) == 64
    (ck / "cerebrum.json").write_text(json.dumps({**meta, "version": 1}))
    loaded = checkpoint.load_checkpoint(ck)  # a checkpoint from before the digest
    assert "state_sha256" not in loaded.meta
    assert capsys.readouterr().err.count("not verified") == 1  # its one warning line
    bad = jax.tree_util.tree_map(np.asarray, files["params"])
    bad["enc_lvl1_block1_conv"]["kernel"] = bad["enc_lvl1_block1_conv"]["kernel"].copy()
    bad["enc_lvl1_block1_conv"]["kernel"][0, 0, 0, 0, 0] = np.nan
    nan_ck = checkpoint.save_checkpoint(tmp_path / "nan", bad, CONFIG)
    code = main(["segment", "--weights", str(nan_ck), str(files["img"]), "--out", str(tmp_path / "o")])
    one_error_line(capsys, code, "enc_lvl1_block1_conv/kernel holds 1 NaN or infinite values")


# ----------------------------------------------------------------------------------------------------------
# 5-9, 12: inputs


def _huge_kernel_h5(files, path: Path) -> Path:
    """The good .h5 with one kernel re-declared as 3x3x3x24x2**30 float32 (96 GiB, never written)."""
    import shutil

    shutil.copy(files["h5"], path)
    with h5py.File(path, "r+") as f:
        group = (
            f["model_weights"]["enc_lvl2_block1_conv"] if "model_weights" in f else f["enc_lvl2_block1_conv"]
        )
        name = [k for k in _datasets(group) if k.endswith("kernel:0") or k.endswith("kernel")][0]
        del group[name]
        group.create_dataset(name, shape=(3, 3, 3, 24, 2**30), dtype="f4", chunks=(1, 1, 1, 1, 1024))
    return path


def _datasets(group) -> list[str]:
    found = []
    group.visit(lambda k: found.append(k) if isinstance(group[k], h5py.Dataset) else None)
    return found


def _nan_h5(files, path: Path) -> Path:
    bad = jax.tree_util.tree_map(lambda a: np.array(a), files["params"])
    bad["dec_lvl1_block1_conv"]["bias"][:] = np.nan
    return convert.write_keras_h5(path, bad, CONFIG)


def _non_utf8(path: Path) -> Path:
    path.write_bytes("index\tname\n0\tbackground\n1\tmati\xe8re blanche\n".encode("latin-1"))
    return path


def _singular(path: Path, sform, dtype=np.float32) -> Path:
    """A NIfTI whose header holds ``sform`` (code 2, no qform) as it is, singular or not: nibabel's
    writer would refuse to decompose it, so the header is written without that step."""
    img = nib.Nifti1Image(np.ones((8, 8, 8), dtype), np.eye(4))
    img.header.set_sform(np.asarray(sform, float), code=2)
    img.header["qform_code"] = 0
    img.update_header = lambda: None
    nib.save(img, path)
    return path


INPUT_CASES = {
    "convert huge kernel": (
        lambda f, t: ["convert", str(_huge_kernel_h5(f, t / "huge.h5")), str(t / "out")],
        "enc_lvl2_block1_conv: kernel has shape (3, 3, 3, 24, 1073741824)",
    ),
    "convert NaN weights": (
        lambda f, t: ["convert", str(_nan_h5(f, t / "nan.h5")), str(t / "out")],
        "layer dec_lvl1_block1_conv: bias holds 2 NaN or infinite values",
    ),
    "convert non-UTF-8 classes": (
        lambda f, t: ["convert", str(f["h5"]), str(t / "out"), "--classes", str(_non_utf8(t / "c.tsv"))],
        "c.tsv: classes file is not UTF-8 text (byte 0xe8",
    ),
    "finetune non-UTF-8 label TSV": (
        lambda f, t: finetune_args(f, t / "out", "--labels", str(_non_utf8(t / "l.tsv"))),
        "l.tsv: label table is not UTF-8 text",
    ),
    "evaluate non-UTF-8 labels": (
        lambda f, t: ["evaluate", str(f["lab"]), str(f["lab"]), "--labels", str(_non_utf8(t / "e.tsv"))],
        "e.tsv: label table is not UTF-8 text",
    ),
    "finetune non-UTF-8 JSON config": (
        lambda f, t: ["finetune", "--config", str(_non_utf8(t / "c.json")), "--out", str(t / "out")],
        "c.json: cannot read config (UnicodeDecodeError",
    ),
    "segment zero affine": (
        lambda f, t: [
            "segment",
            "--weights",
            str(f["ck"]),
            str(_singular(t / "z.nii.gz", np.zeros((4, 4)))),
            "--out",
            str(t / "out"),
        ],  # noqa: E501
        "z.nii.gz: image affine (voxel-to-world matrix) is singular (determinant 0)",
    ),
    "evaluate singular affine": (
        lambda f, t: [
            "evaluate",
            str(_singular(t / "s.nii.gz", np.diag([1, 1, 0, 1]), np.uint8)),
            str(f["lab"]),
        ],
        "s.nii.gz: prediction affine (voxel-to-world matrix) is singular",
    ),
    "finetune grid that cannot fit": (
        lambda f, t: finetune_args(f, t / "out", "--grid", "2048,2048,2048"),
        "--grid: 2048x2048x2048: a training step needs about",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(INPUT_CASES))
def test_bad_input_one_line_exit_2(files, tmp_path, capsys, case):
    make_argv, message = INPUT_CASES[case]
    argv = make_argv(files, tmp_path)
    before = tree(tmp_path)
    one_error_line(capsys, main(argv), message)
    assert tree(tmp_path) == before  # nothing written


def test_huge_integer_image_is_normalised_in_float64():
    from cerebrum_jax.data import preprocess
    from cerebrum_jax.predict.segment import prepare

    volume = np.zeros((16, 16, 16), np.int64)
    volume[4:12, 4:12, 4:12] = 4 * 10**18
    volume[6:10, 6:10, 6:10] = 8 * 10**18
    x = preprocess.zscore(volume)
    assert np.isfinite(x).all() and x.std() == pytest.approx(1.0, rel=1e-4) and len(np.unique(x)) == 3
    prepared, _ = prepare(volume, normalization="zscore")
    np.testing.assert_allclose(prepared, x, atol=1e-5)
    with pytest.raises(InputError, match="z-score statistics of the image are not finite"):
        preprocess.zscore(np.array([0.0, np.inf]))


@pytest.mark.slow
def test_package_experiments_before_the_working_directory(files, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "experiments").mkdir()
    marker = tmp_path / "executed"
    (tmp_path / "experiments" / "demo.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    code = main(finetune_args(files, tmp_path / "out", "--grid", "2048,2048,2048"))
    assert code == 2 and not marker.exists()
    assert f"config: {REPO / 'experiments' / 'demo.py'}" in capsys.readouterr().out


def test_memory_estimate_matches_its_calibration():
    from cerebrum_jax.train import memory

    # BENCHMARKS.md: XLA:CPU asked 94.0 GB for 256x352x224, 8 classes, n_filters 24; kept on the low side
    est = memory.train_step_bytes((256, 352, 224), 8, 24, 1)
    assert 0.7 * 94e9 < est <= 94e9
    assert memory.train_step_bytes((64, 64, 64), 8, 24, 2) == 2 * memory.train_step_bytes((64, 64, 64), 8, 24)
    # virtual CPU devices share one RAM; GPUs split the step (and get a lower-bound figure)
    assert memory.train_step_bytes((64, 64, 64), 8, 24, n_devices=4) == memory.train_step_bytes(
        (64, 64, 64), 8, 24
    )
    gpu = memory.train_step_bytes((256, 352, 224), 8, 24, n_devices=4, backend="gpu")
    assert gpu < est / 4 / 8 and memory.mesh_devices("2x4") == 8 and memory.mesh_devices(None) == 1
    assert memory.train_step_bytes((10, 10, 10), 8, 24, bytes_per_voxel=100) == 100_000


# ----------------------------------------------------------------------------------------------------------
# 11. Ctrl-C during training: one line, exit 130, no Orbax traceback, no wait at exit


def _ctrl_c_default():
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def ctrl_c_handler():
    """Python's own SIGINT handler for the test, as under a terminal (a shell's background job, e.g.
    ``make test &``, starts with SIGINT ignored, and Python then installs none)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


@pytest.mark.slow
def test_ctrl_c_during_training(files, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    argv = finetune_args(files, out, "--epochs", "500")
    p = subprocess.Popen(
        [sys.executable, "-m", "cerebrum_jax", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        preexec_fn=_ctrl_c_default,  # a shell's background job inherits SIGINT ignored; a terminal's does not
    )
    log = out / "fold-1" / "log.txt"
    while not (log.is_file() and "warmup epoch 3:" in log.read_text()):
        assert p.poll() is None, p.communicate()
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=240)  # before the fix: a 300 s wait for Orbax's threads at exit
    err = err.decode()
    # the last line says it; nothing after it (XLA's slow-compile banner may come before, on a busy CPU)
    assert p.returncode == 130 and err.strip().splitlines()[-1] == "cerebrum-jax finetune: interrupted", err
    assert "Traceback" not in err and "ERROR:absl" not in err, err
    ckpts = sorted(p.name for p in (out / "fold-1" / "checkpoints").iterdir())
    assert ckpts == ["best", "last"]  # no temporary directory of an interrupted save
    loop = json.loads((out / "fold-1" / "checkpoints" / "last" / "loop.json").read_text())
    assert len(loop["state_sha256"]) == 64


@pytest.mark.slow
@pytest.mark.parametrize("command", ["finetune", "segment"])
def test_a_handled_error_after_orbax_is_one_line(files, tmp_path, command):
    """An input error found after a checkpoint was restored through Orbax (finetune: data without
    subjects; segment: an input that does not exist) ends a real process with one line and exit 2: no
    "Event loop is closed" or other Orbax traceback at interpreter exit."""
    (tmp_path / "empty").mkdir()
    if command == "finetune":
        argv = ["finetune", "--data", str(tmp_path / "empty"), "--weights", str(files["ck"])]
        argv += ["--out", str(tmp_path / "run"), "--fold", "1", "--no-progress"]
    else:
        argv = ["segment", str(tmp_path / "missing.nii.gz"), "--weights", str(files["ck"])]
        argv += ["--out", str(tmp_path / "seg")]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    r = subprocess.run([sys.executable, "-m", "cerebrum_jax", *argv], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "Event loop" not in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "seg").exists()


class _CtrlC:
    """A metadata value whose text form presses Ctrl-C (sends this process SIGINT) while the checkpoint is
    being written (``save_checkpoint`` turns it into text inside its save)."""

    def __str__(self):
        os.kill(os.getpid(), signal.SIGINT)
        return "pressed"


def test_ctrl_c_during_a_checkpoint_save_finishes_the_save_first(files, tmp_path, ctrl_c_handler):
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(tmp_path / "ck", files["params"], CONFIG, meta={"note": _CtrlC()})
    loaded = checkpoint.load_checkpoint(tmp_path / "ck")  # complete, digest and all
    assert loaded.meta["note"] == "pressed" and sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
