"""docs cannot drift from the code: DESIGN.md's layer table is the one ``model.LAYERS`` renders, and
docs/tutorial.md runs as written."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from cerebrum_jax.model.network import LAYERS, ModelConfig

DESIGN = Path(__file__).resolve().parents[1] / "docs" / "DESIGN.md"
BEGIN, END = "<!-- layer-table:begin -->", "<!-- layer-table:end -->"
OPS = {"conv": "Conv3D", "down": "Conv3D, strided", "up": "Conv3DTranspose"}


def layer_table() -> str:
    """The Markdown layer table of ``model.LAYERS`` with the published widths (n_filters 24)."""
    config = ModelConfig()
    rows = [
        "| # | layer (Keras name) | op | filters | kernel | stride | activation | level |",
        "|---:|---|---|---:|---:|---:|---|---:|",
    ]
    for i, layer in enumerate(LAYERS, start=1):
        filters = "n_classes" if layer.width == 0 else str(config.channels(layer))
        stride = layer.kernel if layer.op in ("down", "up") else 1
        rows.append(
            f"| {i} | `{layer.name}` | {OPS[layer.op]} | {filters} | {layer.kernel} | {stride} | "
            f"{layer.activation} | {layer.level} |"
        )
    return "\n".join(rows)


def test_design_layer_table_is_model_layers():
    text = DESIGN.read_text(encoding="utf-8")
    assert BEGIN in text and END in text, f"{DESIGN} lost its layer-table markers"
    table = text.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert table == layer_table(), (
        "docs/DESIGN.md's layer table differs from model.LAYERS; paste this:\n" + layer_table()
    )


def design_tree() -> dict[str, set[str]]:
    """{subpackage (or "base"): the module names} of the tree drawn in DESIGN.md's "The tree"."""
    text = DESIGN.read_text(encoding="utf-8")
    block = text.split("## The tree", 1)[1].split("```", 2)[1]
    tree, current = {}, None
    for line in block.splitlines():
        words = re.findall(r"[A-Za-z_]+/?", line.split("|")[0])
        if words and words[0].endswith("/"):
            current = words[0].rstrip("/")
            words = words[1:]
        elif line.startswith("  errors"):
            current = "base"
        if current:
            tree.setdefault(current, set()).update(w.rstrip("/") for w in words)
    return tree


def test_design_draws_every_module_in_its_subpackage():
    """DESIGN.md's tree holds every module of the package, each under its own subpackage."""
    package = Path(__file__).resolve().parents[1] / "cerebrum_jax"
    tree = design_tree()
    for path in package.rglob("*.py"):
        if path.stem in ("__init__", "__main__") or "cli" in path.parts:
            continue
        where = path.parent.name if path.parent != package else "base"
        assert path.stem in tree.get(where, set()), f"docs/DESIGN.md's tree lacks {where}/{path.stem}"


TUTORIAL = DESIGN.with_name("tutorial.md")


def tutorial_blocks() -> list[tuple[str, str]]:
    """(language, code) of each fenced block of docs/tutorial.md, in order."""
    blocks = re.findall(r"^```(\w+)\n(.*?)^```$", TUTORIAL.read_text(encoding="utf-8"), re.M | re.S)
    assert blocks, f"{TUTORIAL} has no code blocks"
    return blocks


@pytest.mark.slow  # the tutorial's whole run: a segmentation, a gradient, three jitted train steps
def test_the_tutorial_runs_as_written(tmp_path):
    """Every python block in order as one script, then every sh block with ``cerebrum-jax`` the package's
    own command, in a fresh working directory: the page a researcher copies from cannot rot."""
    blocks = tutorial_blocks()
    assert {lang for lang, _ in blocks} == {"python", "sh"}
    script = "\n".join(code for lang, code in blocks if lang == "python")
    env = {**os.environ, "PYTHONPATH": str(DESIGN.parents[1])}
    p = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "step 2: loss" in p.stdout and (tmp_path / "my-model" / "cerebrum.json").is_file()
    for lang, code in blocks:
        if lang == "sh":
            for line in filter(None, code.splitlines()):
                argv = shlex.split(line.replace("cerebrum-jax", f"{sys.executable} -m cerebrum_jax", 1))
                p = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True)
                assert p.returncode == 0, (line, p.stderr[-3000:])
    written = nib.load(tmp_path / "seg" / "sub-01_space-orig_desc-cerebrum_dseg.nii.gz")
    assert written.shape == (48, 56, 48) and np.allclose(written.affine, np.diag([3.0, 3.0, 3.0, 1.0]))
