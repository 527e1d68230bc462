"""What the installed package carries besides code: the named experiment configs and the demo weights.

An installed wheel holds them as package data, ``cerebrum_jax/_data/experiments/<name>.py`` and
``cerebrum_jax/_data/weights/demo`` (copied from the repository's top-level ``experiments/`` and
``weights/`` at build time: setup.py); a clone (an editable install) reads those top-level folders
themselves. Found through ``importlib.resources``; no jax import.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]  # the clone's root, where the package is not installed


def shipped_dir(kind: str) -> Path | None:
    """The folder ``kind`` ("experiments" or "weights") that ships with this installation: the wheel's
    package data, else the clone's top-level folder; None where neither exists."""
    packaged = importlib.resources.files("cerebrum_jax") / "_data" / kind
    if packaged.is_dir():
        return Path(str(packaged))  # a wheel installs files on disk: configs run as files
    local = REPO / kind
    return local if local.is_dir() and (REPO / "pyproject.toml").is_file() else None


def version() -> str:
    """The installed distribution's version (pyproject.toml's, the one place it is written)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("cerebrum-jax")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"
