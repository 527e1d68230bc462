"""The package's import graph has one direction of flow: each subpackage imports only those below it
(``LAYERS``), function-level imports included; no cycle; import paths from before the subpackages still
work; the light modules stay light."""

import ast
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cerebrum_jax"
# The layers, top to bottom: which subpackages a module of each may import (its own always). "base": the
# modules at the package's top level (errors, choices, fsafe, runtime, shipped, _moved); "api": the
# package's __init__ (the lazy names) and __main__.
BELOW_MODEL = {"model", "base"}
LAYERS = {
    "api": {
        "cli",
        "experiment",
        "train",
        "predict",
        "report",
        "parallel",
        "data",
        "evaluation",
        "model",
        "base",
    },
    "cli": {"experiment", "train", "predict", "report", "parallel", "data", "evaluation", "model", "base"},
    "experiment": {"train", "predict", "report", "parallel", "data", "evaluation", "model", "base"},
    "train": {"parallel", "data", "evaluation", *BELOW_MODEL},
    "predict": {"parallel", "data", "evaluation", *BELOW_MODEL},
    "report": {"data", "evaluation", *BELOW_MODEL},
    "parallel": BELOW_MODEL,
    "data": BELOW_MODEL,
    "evaluation": BELOW_MODEL,
    "model": {"base"},
    "base": {"base"},
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str, modules: set[str]) -> set[str]:
    """The package modules ``path`` imports anywhere in its body (top level or inside functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # a.b.c -> a.b -> a: the module it names
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {name: _imports(path, name, set(files)) for name, path in files.items()}
    for name in graph:  # importing a submodule runs its package's __init__ first: not an edge to follow
        graph[name] = {m for m in graph[name] if not name.startswith(m + ".")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


@pytest.mark.slow
def test_the_graph_is_read():
    graph = import_graph()
    assert "cerebrum_jax.train.steps" in graph["cerebrum_jax.experiment.finetune"]
    assert "cerebrum_jax.model.network" in graph["cerebrum_jax.train.steps"]


@pytest.mark.slow
def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle or [])


def test_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def layer(module: str) -> str:
    """The layer of a package module: its subpackage, "base" or "api" (see ``LAYERS``)."""
    parts = module.split(".")
    if module == "cerebrum_jax" or parts[1:] == ["__main__"]:
        return "api"
    return parts[1] if parts[1] in LAYERS else "base"


def test_every_module_has_a_layer():
    assert {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()} == set(LAYERS) - {
        "api",
        "base",
    }
    assert layer("cerebrum_jax.model.spec") == "model" and layer("cerebrum_jax.fsafe") == "base"


@pytest.mark.slow
def test_imports_flow_down_the_layers():
    graph = import_graph()
    wrong = sorted(
        f"{m} -> {t}"
        for m, targets in graph.items()
        for t in targets
        if layer(t) not in LAYERS[layer(m)] | {layer(m)}
    )
    assert not wrong, "imports against the layer order:\n" + "\n".join(wrong)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("cerebrum_jax.config", "cerebrum_jax.experiment.config"),
        ("cerebrum_jax.checkpoint", "cerebrum_jax.model.checkpoint"),
        ("cerebrum_jax.convert", "cerebrum_jax.model.keras"),
        ("cerebrum_jax.inputs", "cerebrum_jax.data.inputs"),
        ("cerebrum_jax.losses", "cerebrum_jax.train.losses"),
        ("cerebrum_jax.augment", "cerebrum_jax.train.augment"),
        ("cerebrum_jax.sharding", "cerebrum_jax.parallel.sharding"),
        ("cerebrum_jax.metrics", "cerebrum_jax.evaluation.metrics"),
        ("cerebrum_jax.predictor", "cerebrum_jax.predict.predictor"),
        ("cerebrum_jax.html_report", "cerebrum_jax.report.html_report"),
    ],
)
def test_old_import_paths_still_work(old, new):
    assert importlib.import_module(old) is importlib.import_module(new)


@pytest.mark.parametrize(
    ("package", "name", "home"),
    [
        ("cerebrum_jax.model", "ModelConfig", "cerebrum_jax.model.spec"),
        ("cerebrum_jax.model", "init_params", "cerebrum_jax.model.network"),
        ("cerebrum_jax.data", "find_subjects", "cerebrum_jax.data.datasets"),
        ("cerebrum_jax.train", "make_train_step", "cerebrum_jax.train.steps"),
        ("cerebrum_jax.report", "plot_training_curves", "cerebrum_jax.report.figures"),
    ],
)
def test_old_modules_now_subpackages_still_read_their_names(package, name, home):
    assert getattr(importlib.import_module(package), name) is getattr(importlib.import_module(home), name)
    assert not hasattr(importlib.import_module(package), "no_such_name")


@pytest.mark.parametrize(
    "module",
    [
        "cerebrum_jax.model.spec",
        "cerebrum_jax.data.preprocess",
        "cerebrum_jax.data.inputs",
        "cerebrum_jax.data.datasets",
        "cerebrum_jax.data.demo",
        "cerebrum_jax.experiment.config",
    ],
)
def test_light_modules_import_no_jax(module):
    code = f"import sys, {module}\nprint([m for m in ('jax', 'flax', 'optax') if m in sys.modules])"
    env = {**os.environ, "PYTHONPATH": str(PACKAGE.parent)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_the_command_line_catches_non_finite_loss_without_the_training_stack():
    graph = import_graph()
    from cerebrum_jax.errors import NonFiniteLoss

    assert issubclass(NonFiniteLoss, RuntimeError)
    assert graph["cerebrum_jax.errors"] == set()


@pytest.mark.slow
def test_the_finetune_command_line_module_loads_no_training_stack():
    """cli/finetune names NonFiniteLoss and RunDir at import time; optax and orbax come with the run."""
    code = (
        "import sys, cerebrum_jax.cli.finetune\n"
        "print([m for m in ('optax', 'orbax.checkpoint', 'cerebrum_jax.train.steps') if m in sys.modules])"
    )
    env = {**os.environ, "PYTHONPATH": str(PACKAGE.parent)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "[]"
