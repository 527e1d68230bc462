"""The network's specification, without JAX: the layer table of the original, ``ModelConfig`` and the input
grid rule (``DIVISOR``), for what needs the shapes but not the network (preprocessing, checkpoints, the
command line). Svanera et al., Human Brain Mapping 2021 (doi:10.1002/hbm.25636);
github.com/rockNroll87q/cerebrum7t, model_definition.py. The network itself: ``network``.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

DIVISOR = 8  # two down-samplings, by 4 then by 2


class Layer(NamedTuple):
    """One row of the layer table: the original's ThreeLevelsConvUNetStridedConv (Svanera et al. 2021,
    doi:10.1002/hbm.25636; github.com/rockNroll87q/cerebrum7t, model_definition.py); docs/DESIGN.md."""

    name: str
    op: str  # "conv" (3x3x3 or 1x1x1, stride 1), "down" / "up" (kernel == stride; up is transposed)
    width: int  # output channels as a multiple of n_filters (0: n_classes)
    kernel: int
    activation: str  # "enc", "dec", "none" or "softmax"
    level: int  # resolution level of the layer's output (1 = full resolution)


LAYERS: tuple[Layer, ...] = (
    Layer("enc_lvl1_block1_conv", "conv", 1, 3, "enc", 1),
    Layer("down_1to2_conv", "down", 2, 4, "enc", 2),
    Layer("enc_lvl2_block1_conv", "conv", 2, 3, "enc", 2),
    Layer("enc_lvl2_block2_conv", "conv", 2, 3, "enc", 2),
    Layer("down_2to3_conv", "down", 4, 2, "enc", 3),
    Layer("enc_lvl3_block1_conv", "conv", 4, 3, "enc", 3),
    Layer("enc_lvl3_block2_conv", "conv", 4, 3, "enc", 3),
    Layer("enc_lvl3_block3_conv", "conv", 4, 3, "dec", 3),
    Layer("up_3to2_conv", "up", 2, 2, "none", 2),
    Layer("dec_lvl2_block1_conv", "conv", 2, 3, "dec", 2),
    Layer("dec_lvl2_block2_conv", "conv", 2, 3, "dec", 2),
    Layer("up_2to1_conv", "up", 1, 4, "none", 1),
    Layer("dec_lvl1_block1_conv", "conv", 1, 3, "dec", 1),
    Layer("main_output", "conv", 0, 1, "softmax", 1),
)
LAYER_NAMES: tuple[str, ...] = tuple(layer.name for layer in LAYERS)
# The original (model_definition.py) puts a Dropout '<layer>_dr' after every conv but main_output, at
# the rate of the level it belongs to there: 0 at level 1 for these three (down_1to2_conv included),
# ``dropout_rate`` for all the others (up_2to1_conv included, whose Dropout is at level 2).
LEVEL1_DROPOUT: tuple[str, ...] = ("enc_lvl1_block1_conv", "down_1to2_conv", "dec_lvl1_block1_conv")


def dropout_rate(name: str, config: ModelConfig) -> float:
    """The training-time dropout rate after layer ``name``, as in the original (see ``LEVEL1_DROPOUT``)."""
    if name == "main_output" or name in LEVEL1_DROPOUT:
        return 0.0
    return config.dropout_rate


# Keras activation names the network knows (``network.ACTIVATIONS`` maps them to functions)
ACTIVATION_NAMES: tuple[str, ...] = ("relu", "elu", "selu", "tanh", "sigmoid", "linear")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of the network; the defaults are those of the published Glasgow model.

    Attributes:
      n_filters: channels at level 1 (levels 2 and 3 have 2x and 4x).
      n_classes: output classes (softmax channels).
      enc_activation, dec_activation: names in ``ACTIVATION_NAMES`` (Keras names).
      dropout_rate: training-time dropout after every conv but main_output and the level-1 ones of
        ``LEVEL1_DROPOUT`` (see ``dropout_rate``), as in the original.
      compute_dtype: "float32" or "bfloat16"; parameters stay float32 (mixed precision).
      remat: recompute the full-resolution (level 1) activations in the backward pass.
    """

    n_filters: int = 24
    n_classes: int = 7
    enc_activation: str = "relu"
    dec_activation: str = "relu"
    dropout_rate: float = 0.1
    compute_dtype: str = "float32"
    remat: bool = False

    def __post_init__(self):
        for act in (self.enc_activation, self.dec_activation):
            if act not in ACTIVATION_NAMES:
                raise ValueError(f"unknown activation {act!r}; known: {', '.join(ACTIVATION_NAMES)}")
        if self.n_filters < 1 or self.n_classes < 2:
            raise ValueError("n_filters must be >= 1 and n_classes >= 2")
        if self.compute_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"compute_dtype must be float32 or bfloat16, not {self.compute_dtype!r}")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1), not {self.dropout_rate}")

    def channels(self, layer: Layer) -> int:
        return self.n_classes if layer.width == 0 else layer.width * self.n_filters

    def param_shapes(self) -> dict[str, dict[str, tuple[int, ...]]]:
        """Expected kernel and bias shapes per layer, in Keras layouts (see ``init_kernel``)."""
        shapes, cin = {}, 1
        for layer in LAYERS:
            cout, k = self.channels(layer), layer.kernel
            if layer.op == "up":  # Keras Conv3DTranspose: (d, h, w, out, in)
                kernel = (k, k, k, cout, cin)
            else:  # Keras Conv3D, same as Flax: (d, h, w, in, out)
                kernel = (k, k, k, cin, cout)
            shapes[layer.name] = {"kernel": kernel, "bias": (cout,)}
            cin = cout
        return shapes


def check_input(x) -> None:
    """Raise ValueError unless ``x`` (or its shape) is (batch, D, H, W, 1) with D, H, W divisible by 8."""
    shape = tuple(getattr(x, "shape", x))
    if len(shape) != 5:
        raise ValueError(f"input must be 5-D (batch, D, H, W, C), got shape {shape}")
    if shape[-1] != 1:
        raise ValueError(f"input must have 1 channel, got {shape[-1]} (shape {shape})")
    bad = [s for s in shape[1:4] if s % DIVISOR or s == 0]
    if bad:
        raise ValueError(f"spatial sizes must be positive multiples of {DIVISOR}, got {shape[1:4]}")
