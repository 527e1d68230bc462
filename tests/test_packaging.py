"""The installed package is self-sufficient (issue 22): a wheel built from the repository's files,
installed into a fresh virtual environment in a temporary directory outside the repository, segments with
its shipped demo weights and fine-tunes the shipped ``demo`` config from there.

The environment gets the wheel only (``--no-deps``); its dependencies come from the test's own
environment through a .pth line (appended after the fresh site-packages, so the wheel's cerebrum_jax is
the one imported), which keeps the test offline and quick. The build runs without isolation with the
pinned setuptools of the ``test`` extra (the build-system's pins).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def tracked_copy(dest: Path) -> Path:
    """The files git tracks or would track (a fresh clone's; no stale build/), copied to ``dest``."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, (os.fsdecode(f) for f in files)):
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    return dest


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv's bin dir, environment, working directory outside the repository)."""
    root = tmp_path_factory.mktemp("wheel")
    src = tracked_copy(root / "src")
    pip = [sys.executable, "-m", "pip"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(root / "dist"), str(src)],
        check=True,
        capture_output=True,
    )
    (wheel,) = (root / "dist").glob("cerebrum_jax-*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    subprocess.run(
        [*pip, "--python", str(venv / "bin" / "python"), "install", "--no-deps", "-q", str(wheel)],
        check=True,
        capture_output=True,
    )
    site = Path(
        subprocess.run(
            [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    (site / "zz_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    work = root / "work"
    work.mkdir()
    return venv / "bin", env, work


def run(installed, *argv, timeout=900) -> subprocess.CompletedProcess:
    bin_dir, env, work = installed
    p = subprocess.run(
        [str(bin_dir / argv[0]), *argv[1:]],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert p.returncode == 0, (argv, p.stdout[-2000:], p.stderr[-3000:])
    return p


@pytest.mark.slow  # builds and installs a wheel, imports jax in fresh processes
def test_the_wheel_holds_what_the_commands_need(installed):
    bin_dir, _, work = installed
    where = run(installed, "python", "-c", "import cerebrum_jax; print(cerebrum_jax.__file__)").stdout
    assert str(bin_dir.parent) in where and str(REPO) not in where, where  # the wheel's, not the clone's
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert run(installed, "cerebrum-jax", "--version").stdout.startswith(f"cerebrum-jax {version} (jax ")

    rng = np.random.default_rng(0)
    volume = rng.normal(100, 20, (60, 72, 60)).astype(np.float32)
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    nib.save(nib.Nifti1Image(volume, affine), work / "sub-01_T1w.nii.gz")
    mask = np.zeros(volume.shape, np.uint8)
    mask[8:52, 10:62, 8:52] = 1  # the demo weights were trained on brain-masked inputs: they need one
    nib.save(nib.Nifti1Image(mask, affine), work / "sub-01_brainmask.nii.gz")
    args = ["--out", "seg", "sub-01_T1w.nii.gz", "--mask", "sub-01_brainmask.nii.gz"]
    p = run(installed, "cerebrum-jax", "segment", *args)
    assert "_data/weights/demo" in p.stdout + p.stderr, p.stdout  # the shipped demo weights, said
    (out,) = (work / "seg").glob("sub-01*_dseg.nii.gz")
    img = nib.load(out)
    labels = np.asarray(img.dataobj)
    assert labels.shape == volume.shape and np.allclose(img.affine, affine)
    assert set(np.unique(labels)) <= {0, 1, 2, 3} and len(np.unique(labels)) > 1


@pytest.mark.slow  # a one-epoch demo fold from the installed package: the demo cohort, a compile
def test_the_shipped_demo_config_fine_tunes_outside_the_clone(installed):
    _, _, work = installed
    argv = ["cerebrum-jax", "finetune", "--config", "demo", "--fold", "3", "--epochs", "1"]
    p = run(installed, *argv, "--out", "run", "--no-progress")
    assert "_data/experiments/demo.py" in p.stdout, p.stdout[-2000:]  # the config: the wheel's file
    fold = work / "run" / "fold-3"
    assert (fold / "checkpoints" / "best" / "cerebrum.json").is_file()
    assert (fold / "report.html").is_file() and (work / "data" / "demo").is_dir()
