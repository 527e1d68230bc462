"""The package's import graph has one direction of flow: no cycle, function-level imports included, and
the training core never imports its orchestrator or the command line."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cerebrum_jax"
CORE = ("train", "model", "losses", "augment", "loop")


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
    assert "cerebrum_jax.train" in graph["cerebrum_jax.finetune"]
    assert "cerebrum_jax.model" in graph["cerebrum_jax.train"]


@pytest.mark.slow
def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle or [])


def test_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.slow
@pytest.mark.parametrize("core", CORE)
def test_the_core_never_imports_its_orchestrators(core):
    graph = import_graph()
    name = f"cerebrum_jax.{core}"
    if name not in graph:
        pytest.skip(f"no module {name}")
    cli = {m for m in graph if m == "cerebrum_jax.cli" or m.startswith("cerebrum_jax.cli.")}
    banned = {"cerebrum_jax.finetune", "cerebrum_jax.runhooks", *cli}
    reach, todo = set(), [name]
    while todo:  # everything the core imports, directly or not
        for m in graph[todo.pop()]:
            if m not in reach:
                reach.add(m)
                todo.append(m)
    assert not reach & banned, f"{name} imports {sorted(reach & banned)}"


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
        "print([m for m in ('optax', 'orbax.checkpoint', 'cerebrum_jax.train') if m in sys.modules])"
    )
    env = {**os.environ, "PYTHONPATH": str(PACKAGE.parent)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "[]"
