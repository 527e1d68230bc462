"""Signals, disk, locks and output places (issue 21): Ctrl-C and SIGTERM during a run's first compile and
during training (real processes), a full disk during a checkpoint save and a segmentation (a real tmpfs),
the run lock planted as a symbolic link, segment into a raw BIDS dataset or the input's own folder, a
killed segment's temporary file, and input names near the file system's name limit."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from failure_kit import (  # noqa: F401  (files: a fixture)
    CONFIG,
    ENV,
    REPO_ROOT,
    files,
    finetune_args,
    one_error_line,
    tree,
)

from cerebrum_jax import fsafe
from cerebrum_jax.cli import main, sigterm_raises
from cerebrum_jax.errors import InputError, Terminated
from cerebrum_jax.experiment import runhooks
from cerebrum_jax.model import checkpoint


def _signals_default():
    # a shell's background job inherits SIGINT ignored; a terminal's process does not
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_finetune(files, out: Path, *extra, cache: str = "off") -> subprocess.Popen:
    """A real ``python -m cerebrum_jax finetune`` process (the console script's path, jemalloc restart
    included), compiling from scratch (``cache`` off) unless told a cache directory."""
    argv = ["--compile-cache", cache, *finetune_args(files, out, *extra)]
    return subprocess.Popen(
        [sys.executable, "-m", "cerebrum_jax", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=ENV,
        preexec_fn=_signals_default,
    )


def wait_for_log(p: subprocess.Popen, log: Path, text: str, timeout: float = 600) -> None:
    """Wait until the run's log.txt holds ``text`` (the process must still run)."""
    deadline = time.monotonic() + timeout
    while not (log.is_file() and text in log.read_text()):
        assert p.poll() is None, p.communicate()
        assert time.monotonic() < deadline, f"no {text!r} in {log} after {timeout} s"
        time.sleep(0.1)


def leftovers(run: Path) -> list[str]:
    """Temporary names of interrupted saves (and lock files) left anywhere under ``run``."""
    names = [p.name for p in run.rglob("*")]
    return [n for n in names if n.startswith(".")]


SIGNALS = [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")]


@pytest.mark.slow  # a real process importing jax, compiling the demo's programs
@pytest.mark.parametrize("signum, code, word", SIGNALS, ids=["ctrl-c", "sigterm"])
def test_signal_during_the_first_compile(files, tmp_path, signum, code, word):
    """Before the fix a Ctrl-C 3-5 s into the first compile printed "interrupted" and then died of SIGSEGV
    (Python's finalisation against XLA's compile threads); SIGTERM ended the run without a line."""
    out = tmp_path / "run"
    p = start_finetune(files, out, "--epochs", "50")
    wait_for_log(p, out / "fold-1" / "log.txt", "fold 1:")  # the first compile starts right after it
    time.sleep(3)  # into the compile (no timing is asserted: a signal at any moment must end the same way)
    p.send_signal(signum)
    _, err = p.communicate(timeout=300)
    err = err.decode()
    assert p.returncode == code, err
    assert err.strip().splitlines()[-1] == f"cerebrum-jax finetune: {word}" and "Traceback" not in err, err
    assert leftovers(out) == [], leftovers(out)  # no checkpoints/.last.* and no lock file


@pytest.mark.parametrize("delay", [0.4, 0.8, 1.6])
def test_ctrl_c_while_python_imports_jax(files, tmp_path, delay):
    """Before the fix the package's own import (jax, flax) ran before any handler: a Ctrl-C in the first
    seconds ended with Python's traceback; one inside jaxlib's or numpy's initialisation with a broken
    import ("internal error") or SIGSEGV. The command line imports nothing heavy before ``main``, and
    ``main`` holds the signal until its imports end."""
    out = tmp_path / "run"
    p = start_finetune(files, out)
    time.sleep(delay)  # the subcommands' imports take seconds; the run has not started
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    err = err.decode()
    assert p.returncode == 130, err
    assert err.strip().splitlines()[-1] in ("cerebrum-jax: interrupted", "cerebrum-jax finetune: interrupted")
    assert "Traceback" not in err, err


def test_the_command_line_imports_no_jax_before_its_handlers():
    code = "import sys, cerebrum_jax.cli; print(sorted(m for m in sys.modules if m.split('.')[0] in {m_}))"
    code = code.replace("{m_}", repr({"jax", "jaxlib", "flax", "numpy", "scipy", "optax", "orbax"}))
    out = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def _chained(exc: BaseException, via: BaseException, how: str) -> BaseException:
    setattr(exc, how, via)
    return exc


CHAINS = [  # (exception, the interrupt behind it)
    (
        _chained(ImportError("numpy._core.multiarray failed to import"), KeyboardInterrupt(), "__cause__"),
        KeyboardInterrupt,
    ),
    (
        _chained(AttributeError("x"), _chained(ImportError(), Terminated(), "__context__"), "__context__"),
        Terminated,
    ),
    (ValueError("a defect"), None),
    (_chained(ValueError("a defect"), ImportError("no module"), "__cause__"), None),
]


@pytest.mark.parametrize("exc, behind", CHAINS)
def test_an_interrupt_behind_an_import_error_is_an_interrupt(exc, behind):
    from cerebrum_jax.cli import interrupt_behind

    found = interrupt_behind(exc)
    assert (type(found) if found is not None else None) is behind


SWALLOWED = """
import gc, sys, time
from cerebrum_jax.cli import sigterm_raises, swallowed_interrupts_redelivered
from cerebrum_jax.errors import Terminated

class Bomb:
    def __del__(self):
        raise {exc}

def callback(phase, info):  # XLA's kind of garbage-collection callback
    if phase == "start":
        gc.callbacks.remove(callback)
        raise {exc}

with sigterm_raises(), swallowed_interrupts_redelivered():
    try:
        {trigger}
        time.sleep(3)
        print("went on")
    except Terminated:
        print("Terminated")
    except KeyboardInterrupt:
        print("KeyboardInterrupt")
"""
TRIGGERS = {"gc callback": "gc.callbacks.append(callback); gc.collect()", "__del__": "Bomb()"}


@pytest.mark.parametrize("where", TRIGGERS)
@pytest.mark.parametrize(
    "exc, seen",
    [("KeyboardInterrupt", "KeyboardInterrupt"), ("Terminated", "Terminated"), ("ValueError", "went on")],
)
def test_an_interrupt_swallowed_by_a_callback_is_delivered_again(where, exc, seen):
    """A Ctrl-C that landed in one of XLA's garbage-collection callbacks was printed as "Exception
    ignored" and lost (the run went on); any other exception there keeps Python's report."""
    code = SWALLOWED.format(exc=exc, trigger=TRIGGERS[where])
    p = subprocess.run(
        [sys.executable, "-c", code], env=ENV, capture_output=True, text=True, preexec_fn=_signals_default
    )
    assert p.stdout.strip() == seen, (p.stdout, p.stderr)
    assert ("Exception ignored" in p.stderr) == (exc == "ValueError"), p.stderr


@pytest.mark.slow
def test_sigterm_during_training_keeps_the_checkpoints(files, tmp_path):
    """SIGTERM (a preempted SLURM or Kubernetes job) mid-training: "terminated", exit 143, checkpoints/last
    complete (a save in progress finishes first), and --resume goes on from it."""
    out = tmp_path / "run"
    p = start_finetune(files, out, "--epochs", "500")
    wait_for_log(p, out / "fold-1" / "log.txt", "warmup epoch 3:")
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=300)
    err = err.decode()
    assert p.returncode == 143 and err.strip().splitlines()[-1] == "cerebrum-jax finetune: terminated", err
    assert "Traceback" not in err and "ERROR:absl" not in err, err
    assert sorted(q.name for q in (out / "fold-1" / "checkpoints").iterdir()) == ["best", "last"]
    loop = json.loads((out / "fold-1" / "checkpoints" / "last" / "loop.json").read_text())
    assert len(loop["state_sha256"]) == 64 and leftovers(out) == []
    p = start_finetune(files, out, "--epochs", "500", "--resume")  # what the requeued job runs
    log = out / "fold-1" / "log.txt"
    wait_for_log(p, log, "resuming at phase")
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 143 and leftovers(out) == [], err.decode()
    resumed = [line for line in log.read_text().splitlines() if "resuming at phase" in line]
    assert resumed and resumed[0].endswith(f", epoch {loop['next_epoch'] + 1}"), resumed


class _Sigterm:
    """A metadata value whose text form sends this process SIGTERM while the checkpoint is being written."""

    def __str__(self):
        os.kill(os.getpid(), signal.SIGTERM)
        return "terminated"


def test_sigterm_during_a_checkpoint_save_finishes_the_save_first(files, tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated), sigterm_raises():
        checkpoint.save_checkpoint(tmp_path / "ck", files["params"], CONFIG, meta={"note": _Sigterm()})
    loaded = checkpoint.load_checkpoint(tmp_path / "ck")  # complete, digest and all
    assert loaded.meta["note"] == "terminated" and sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    assert signal.getsignal(signal.SIGTERM) == before  # restored


# ----------------------------------------------------------------------------------------------------------
# A full disk: a real tmpfs (mounting needs root; skipped, saying why, where it is not permitted)


@pytest.fixture
def small_disk():
    """mount(size) -> a fresh tmpfs of ``size`` (e.g. "2m"), unmounted after the test."""
    mounted = []

    def mount(size: str) -> Path:
        where = Path(tempfile.mkdtemp(prefix="cerebrum-tmpfs-"))
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True
        )
        if r.returncode != 0:
            where.rmdir()
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip() or 'not root'})")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", str(where)], check=False)
        with contextlib.suppress(OSError):
            where.rmdir()


def fill(disk: Path, leave: int) -> None:
    """Fill ``disk`` with one file until about ``leave`` bytes are free."""
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    with open(disk / "filler", "wb") as f:
        with contextlib.suppress(OSError):
            f.write(b"\0" * max(0, free - leave))


@pytest.mark.parametrize("when", ["up front", "midway"])
def test_disk_full_during_a_checkpoint_save_keeps_the_last_good_one(files, small_disk, monkeypatch, when):
    """Refused by the free-space check before Orbax starts, or (that check passed: the disk fills while
    Orbax writes) failing midway: one line naming the directory, the previous checkpoint as it was."""
    disk = small_disk("2m")
    ck = checkpoint.save_checkpoint(disk / "ck", files["params"], CONFIG)
    good = tree(ck)
    fill(disk, 4096)
    if when == "midway":
        monkeypatch.setattr(fsafe, "SPACE_MARGIN", -(1 << 30))  # the check passes whatever is free
    with pytest.raises(InputError, match="no space left on device") as e:
        checkpoint.save_checkpoint(ck, files["params"], CONFIG, meta={"next": 1}, overwrite=True)
    assert str(disk) in str(e.value) and "\n" not in str(e.value)
    assert tree(ck) == good and sorted(p.name for p in disk.iterdir()) == ["ck", "filler"]  # nothing else
    assert checkpoint.load_checkpoint(ck).meta.get("next") is None  # the previous one, complete


def test_a_failed_saves_directory_stays_removed_while_a_writer_recreates_it(tmp_path):
    """A writer thread of a failed Orbax save recreated the temporary directory just after it was removed
    (``.last.*.tmp`` left behind, seen under a parallel run): the removal waits until it stays gone."""
    import threading

    target = tmp_path / ".last.x.tmp"
    (target / "state").mkdir(parents=True)
    stop = time.monotonic() + 0.35

    def late_writer():
        while time.monotonic() < stop:
            with contextlib.suppress(OSError):
                (target / "state").mkdir(parents=True, exist_ok=True)
            time.sleep(0.02)

    writer = threading.Thread(target=late_writer)
    writer.start()
    fsafe.remove_tree(target)
    writer.join()
    assert not target.exists()


def test_disk_full_during_a_save_of_checkpoints_last(files, small_disk, monkeypatch):
    """The resumable state (params, Adam's state, loop.json) into a full disk midway: refused, and the
    checkpoints/last of the epoch before still complete (its loop.json digest matches its state)."""
    disk = small_disk("2m")
    last = disk / "checkpoints" / "last"
    state = {"params": files["params"], "opt_state": files["params"], "step": np.int32(3)}
    runhooks.save_last(last, state, {"next_epoch": 3})
    good = tree(last)
    fill(disk, 4096)
    monkeypatch.setattr(fsafe, "SPACE_MARGIN", -(1 << 30))  # past the up-front check: fails while writing
    with pytest.raises(InputError, match="no space left on device while writing checkpoint last"):
        runhooks.save_last(last, state, {"next_epoch": 4})
    assert tree(last) == good and sorted(p.name for p in last.parent.iterdir()) == ["last"]
    loop = json.loads((last / "loop.json").read_text())
    assert loop["next_epoch"] == 3 and loop["state_sha256"] == checkpoint.state_digest(last / "state")


@pytest.mark.slow
def test_finetune_into_a_nearly_full_disk(files, small_disk):
    """A fine-tuning run whose disk has room for its log and config but not a checkpoint: one line naming
    the checkpoints directory, exit 2, no temporary directory of a save."""
    disk = small_disk("2m")
    fill(disk, 160 << 10)
    r = subprocess.run(
        [sys.executable, "-m", "cerebrum_jax", "--compile-cache", "off", *finetune_args(files, disk / "run")],
        capture_output=True,
        text=True,
        env=ENV,
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "no space left on device" in r.stderr.lower() and "Traceback" not in r.stderr, r.stderr
    assert leftovers(disk / "run") == [], leftovers(disk / "run")


@pytest.mark.slow  # real processes importing jax: what a user sees on stderr, Orbax's threads included
@pytest.mark.parametrize("leave", [0, 96 << 10, 400 << 10])
def test_disk_full_during_convert_is_one_line(files, small_disk, leave):
    """A checkpoint into a nearly full disk, however full: refused before Orbax starts, or failing midway,
    or fitting; never a traceback, never a temporary directory left."""
    disk = small_disk("2m")
    fill(disk, leave)
    r = subprocess.run(
        [sys.executable, "-m", "cerebrum_jax", "convert", str(files["h5"]), str(disk / "ck")],
        capture_output=True,
        text=True,
        env=ENV,
    )
    names = sorted(p.name for p in disk.iterdir())
    if r.returncode == 0:  # it fitted: complete
        assert checkpoint.load_checkpoint(disk / "ck").config == CONFIG and names == ["ck", "filler"]
    else:
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert f"{disk}: no space left on device while writing checkpoint ck" in r.stderr, r.stderr
        assert names == ["filler"], names
    assert r.returncode == (0 if leave > 200 << 10 else 2)  # the checkpoint takes ~120 KiB


def test_disk_full_during_the_second_segmentation(files, small_disk, capsys):
    """Two volumes into a 2 MB disk: the first's files fit, the second's probabilities (3 MB of noise) do
    not: one line naming the file, no partial file under a final name, no temporary one."""
    disk, rng = small_disk("2m"), np.random.default_rng(1)
    big = disk.parent / f"{disk.name}-big.nii.gz"
    nib.save(nib.Nifti1Image(rng.random((64, 64, 64), np.float32), np.eye(4)), big)
    try:
        code = main(
            ["segment", str(files["img"]), str(big), "--weights", str(files["ck"]), "--out", str(disk)]
        )
    finally:
        big.unlink()
    err = one_error_line(capsys, code, "No space left on device")
    assert "big_space-orig_desc-cerebrum_probseg.nii.gz" in err and ".tmp" not in err, err
    names = sorted(p.name for p in disk.iterdir())
    assert not [n for n in names if "big" in n or n.startswith(".")], names
    assert "dataset_description.json" not in names and "dseg.tsv" not in names  # written last, once all done
    assert nib.load(disk / "in_space-orig_desc-cerebrum_dseg.nii.gz").shape == (8, 8, 8)  # the first, whole


# ----------------------------------------------------------------------------------------------------------
# The run lock, output places, temporary names


def test_lock_file_planted_as_a_link_is_not_followed(tmp_path, capsys, files):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out = tmp_path / "seg"
    out.mkdir()
    (out / fsafe.LOCK_NAME).symlink_to(victim)
    with pytest.raises(InputError, match="symbolic link"):
        fsafe.DirLock(out)
    code = main(["segment", str(files["img"]), "--weights", str(files["ck"]), "--out", str(out)])
    one_error_line(capsys, code, f"{fsafe.LOCK_NAME}: is a symbolic link")
    assert victim.read_text() == "precious\n" and [p.name for p in out.iterdir()] == [fsafe.LOCK_NAME]


def raw_dataset(root: Path, files) -> Path:
    """A raw BIDS dataset (DatasetType raw) with its own dseg.tsv and one T1w; returns the T1w."""
    anat = root / "sub-01" / "anat"
    anat.mkdir(parents=True)
    (root / "dataset_description.json").write_text(
        '{"Name": "mine", "BIDSVersion": "1.10.0", "DatasetType": "raw"}'
    )
    (root / "dseg.tsv").write_text("index\tname\n0\tmy own labels\n")
    t1w = anat / "sub-01_T1w.nii.gz"
    t1w.write_bytes(files["img"].read_bytes())
    return t1w


DESCRIPTIONS = {
    "raw": ({"Name": "x", "BIDSVersion": "1.10.0", "DatasetType": "raw"}, "a raw BIDS dataset"),
    "no DatasetType": ({"Name": "x", "BIDSVersion": "1.10.0"}, "a raw BIDS dataset"),
    "fmriprep": (
        {"Name": "x", "DatasetType": "derivative", "GeneratedBy": [{"Name": "fMRIPrep"}]},
        "another pipeline's derivative (fMRIPrep)",
    ),
}


@pytest.mark.parametrize("kind", DESCRIPTIONS)
def test_segment_never_writes_over_another_dataset(files, tmp_path, capsys, kind):
    description, message = DESCRIPTIONS[kind]
    root = tmp_path / "bids"
    t1w = raw_dataset(root, files)
    (root / "dataset_description.json").write_text(json.dumps(description))
    before = tree(root)
    code = main(["segment", str(t1w), "--weights", str(files["ck"]), "--out", str(root)])
    one_error_line(capsys, code, message)
    assert tree(root) == before  # its description and dseg.tsv untouched, nothing added


def test_segment_into_a_folder_with_another_dseg_tsv(files, tmp_path, capsys):
    out = tmp_path / "labels"
    out.mkdir()
    (out / "dseg.tsv").write_text("index\tname\n0\tsomething else\n")
    before = tree(out)
    code = main(["segment", str(files["img"]), "--weights", str(files["ck"]), "--out", str(out)])
    one_error_line(capsys, code, "dseg.tsv of other labels")
    assert tree(out) == before


def test_segment_into_the_inputs_own_folder(files, tmp_path, capsys):
    """--out = the folder holding the inputs (and again: a second run replaces its own files): the
    outputs are named apart from the inputs, which stay as they were."""
    t1w = raw_dataset(tmp_path / "bids", files)
    second = t1w.with_name("sub-01_run-2_T1w.nii.gz")
    second.write_bytes(t1w.read_bytes())
    inputs = {p.name: p.read_bytes() for p in (t1w, second)}
    for _ in range(2):
        code = main(
            ["segment", str(t1w), str(second), "--weights", str(files["ck"]), "--out", str(t1w.parent)]
        )
        assert code == 0, capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (t1w, second)} == inputs
    names = {p.name for p in t1w.parent.iterdir()}
    assert {
        "sub-01_space-orig_desc-cerebrum_dseg.nii.gz",
        "sub-01_run-2_space-orig_desc-cerebrum_dseg.nii.gz",
    } <= names
    assert json.loads((t1w.parent / "dataset_description.json").read_text())["DatasetType"] == "derivative"


WRITER = """
import sys, time
from cerebrum_jax.fsafe import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    tmp.write_bytes(b"half a volume")
    print("writing", flush=True)
    time.sleep(600)
"""


def test_a_killed_segments_temporary_file_is_removed_by_the_next(files, tmp_path, capsys):
    out = tmp_path / "seg"
    target = out / "in_space-orig_desc-cerebrum_dseg.nii.gz"
    p = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], stdout=subprocess.PIPE, env=ENV)
    assert p.stdout.readline().strip() == b"writing"
    p.kill()  # kill -9: no clean-up of its own
    p.wait(timeout=60)
    left = [q.name for q in out.iterdir()]
    assert len(left) == 1 and left[0].startswith(".") and left[0].endswith(".tmp.nii.gz"), left
    (out / ".notes.txt").write_text("a user's hidden file\n")
    code = main(["segment", str(files["img"]), "--weights", str(files["ck"]), "--out", str(out)])
    said = capsys.readouterr()
    assert code == 0, said.err
    assert f"removed 1 leftover(s) of an interrupted write: {left[0]}" in said.out
    names = sorted(q.name for q in out.iterdir())
    assert left[0] not in names and ".notes.txt" in names and target.name in names


@pytest.mark.parametrize("length, ok", [(200, True), (240, False)])
def test_long_input_names(files, tmp_path, capsys, length, ok):
    """A 200-character input name is segmented (its temporary names are cut short); one whose output name
    would pass the file system's 255 bytes is refused before any work, naming the input."""
    stem = ("long" + uuid.uuid4().hex * 8)[:length]
    img = tmp_path / f"{stem}.nii.gz"
    img.write_bytes(files["img"].read_bytes())
    out = tmp_path / "seg"
    code = main(["segment", str(img), "--weights", str(files["ck"]), "--out", str(out)])
    if ok:
        assert code == 0, capsys.readouterr().err
        assert (out / f"{stem}_space-orig_desc-cerebrum_probseg.nii.gz").is_file()
    else:
        err = one_error_line(capsys, code, "over the file system's limit of 255")
        assert str(img) in err and not out.exists(), err
