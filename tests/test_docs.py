"""docs/DESIGN.md cannot drift from the code: its layer table is the one ``model.LAYERS`` renders."""

from pathlib import Path

from cerebrum_jax.model import LAYERS, ModelConfig

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


def test_design_names_every_module():
    """Every module of the package has its line in DESIGN.md's table of owners."""
    text = DESIGN.read_text(encoding="utf-8")
    package = Path(__file__).resolve().parents[1] / "cerebrum_jax"
    modules = [p.stem for p in package.glob("*.py") if p.stem not in ("__init__", "__main__")]
    missing = [m for m in sorted(modules) if f"`{m}`" not in text]
    assert not missing, f"docs/DESIGN.md does not name {missing}"
