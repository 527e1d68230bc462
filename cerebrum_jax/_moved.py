"""Import paths from before the subpackages, kept working.

Until the package was split into subpackages (``model``, ``data``, ``parallel``, ``evaluation``, ``train``,
``predict``, ``report``, ``experiment``), every module sat at the top level. A finder at the end of
``sys.meta_path`` (asked only when no module of that name exists) hands out the module's new home under
its old name: ``import cerebrum_jax.config`` is ``cerebrum_jax.experiment.config``. The four old modules
whose name is now a subpackage's (``model``, ``data``, ``train``, ``report``) are served by that
subpackage's ``__init__`` (``forward``).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from pathlib import Path

MOVED = {  # old top-level module -> its home
    "lean": "model.lean",
    "checkpoint": "model.checkpoint",
    "convert": "model.keras",
    "nifti": "data.nifti",
    "bids": "data.bids",
    "labels": "data.labels",
    "preprocess": "data.preprocess",
    "inputs": "data.inputs",
    "demo": "data.demo",
    "fullsize": "data.fullsize",
    "skeleton": "data.skeleton",
    "sharding": "parallel.sharding",
    "distributed": "parallel.distributed",
    "shares": "parallel.shares",
    "metrics": "evaluation.metrics",
    "surfaces": "evaluation.surfaces",
    "losses": "train.losses",
    "augment": "train.augment",
    "synth": "train.synth",
    "streamed": "train.streamed",
    "loop": "train.loop",
    "memory": "train.memory",
    "predictor": "predict.predictor",
    "segment": "predict.segment",
    "html_report": "report.html_report",
    "panels": "report.panels",
    "surface_views": "report.surface_views",
    "surface_viewer": "report.surface_viewer",
    "config": "experiment.config",
    "fold": "experiment.fold",
    "finetune": "experiment.finetune",
    "rundir": "experiment.rundir",
    "runguard": "experiment.runguard",
    "runhooks": "experiment.runhooks",
    "runlog": "experiment.runlog",
    "results_page": "experiment.results_page",
    "bids_app": "experiment.bids_app",
}


class _OldPaths(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        old = fullname.partition("cerebrum_jax.")[2]
        if fullname.startswith("cerebrum_jax.") and old in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        return importlib.import_module("cerebrum_jax." + MOVED[spec.name.partition(".")[2]])

    def exec_module(self, module):
        pass  # already run, under its new name


def install() -> None:
    if not any(isinstance(f, _OldPaths) for f in sys.meta_path):
        sys.meta_path.append(_OldPaths())


def forward(package: str, modules: tuple[str, ...]):
    """A subpackage's module ``__getattr__`` that reads a name missing from it in ``modules`` (in order):
    the names of the old top-level module it replaces (``cerebrum_jax.model.ModelConfig``). Its own
    submodules are never looked up there (``from cerebrum_jax.model import spec`` stays light)."""
    here = Path(sys.modules[package].__file__).parent

    def __getattr__(name: str):
        if not name.startswith("__") and not (here / f"{name}.py").exists():
            for module in modules:
                found = importlib.import_module(f"{package}.{module}")
                if hasattr(found, name):
                    return getattr(found, name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
