"""Test-only: the CEREBRUM-7T network (docs/DESIGN.md, the layer table) built with real Keras 3 (JAX backend).

Layer names, order, kernels, strides and activations follow the layer table of the original code
(github.com/rockNroll87q/cerebrum7t), so an .h5
written by this model has the layout of the original ThreeLevelsConvUNetStridedConv. Keras is a
test-only dependency of cerebrum-jax; import this module only from tests.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402
import numpy as np  # noqa: E402

# (name, op, width in units of n_filters (0: n_classes), kernel == stride for down/up, activation kind)
TABLE = (
    ("enc_lvl1_block1_conv", "conv", 1, 3, "enc"),
    ("down_1to2_conv", "down", 2, 4, "enc"),
    ("enc_lvl2_block1_conv", "conv", 2, 3, "enc"),
    ("enc_lvl2_block2_conv", "conv", 2, 3, "enc"),
    ("down_2to3_conv", "down", 4, 2, "enc"),
    ("enc_lvl3_block1_conv", "conv", 4, 3, "enc"),
    ("enc_lvl3_block2_conv", "conv", 4, 3, "enc"),
    ("enc_lvl3_block3_conv", "conv", 4, 3, "dec"),
    ("up_3to2_conv", "up", 2, 2, "none"),
    ("dec_lvl2_block1_conv", "conv", 2, 3, "dec"),
    ("dec_lvl2_block2_conv", "conv", 2, 3, "dec"),
    ("up_2to1_conv", "up", 1, 4, "none"),
    ("dec_lvl1_block1_conv", "conv", 1, 3, "dec"),
    ("main_output", "conv", 0, 1, "softmax"),
)


def _layer(name, op, width, k, act, n_filters, n_classes, enc, dec):
    filters = n_classes if width == 0 else width * n_filters
    activation = {"enc": enc, "dec": dec, "none": None, "softmax": "softmax"}[act]
    if op == "up":
        return keras.layers.Conv3DTranspose(
            filters, k, strides=k, padding="same", activation=activation, name=name
        )
    stride, padding = (k if op == "down" else 1), ("valid" if name == "main_output" else "same")
    return keras.layers.Conv3D(filters, k, strides=stride, padding=padding, activation=activation, name=name)


def build(
    n_filters: int = 24, n_classes: int = 7, enc: str = "relu", dec: str = "relu", dropout: float = 0.1
):
    """The reference network as a keras.Model: (B, D, H, W, 1) -> (B, D, H, W, n_classes) softmax."""
    layers = {row[0]: _layer(*row, n_filters, n_classes, enc, dec) for row in TABLE}

    def f(name, x):
        y = layers[name](x)
        if name == "main_output":
            return y
        # Dropout after every conv, named and with rates as the original (level-1 rate 0).
        rate = 0.0 if name in ("enc_lvl1_block1_conv", "down_1to2_conv", "dec_lvl1_block1_conv") else dropout
        return keras.layers.Dropout(rate, name=name.removesuffix("_conv") + "_dr")(y)

    inp = keras.Input((None, None, None, 1), name="main_input")
    l1 = f("enc_lvl1_block1_conv", inp)
    x = f("enc_lvl2_block1_conv", f("down_1to2_conv", l1))
    l2 = f("enc_lvl2_block2_conv", x)
    x = f("enc_lvl3_block1_conv", f("down_2to3_conv", l2))
    x = f("enc_lvl3_block3_conv", f("enc_lvl3_block2_conv", x))
    x = keras.layers.Add(name="skip_conn_lvl2")([l2, f("up_3to2_conv", x)])
    x = f("dec_lvl2_block2_conv", f("dec_lvl2_block1_conv", x))
    x = keras.layers.Add(name="skip_conn_lvl1")([l1, f("up_2to1_conv", x)])
    out = f("main_output", f("dec_lvl1_block1_conv", x))
    return keras.Model(inp, out, name="ThreeLevelsConvUNetStridedConv")


def randomize(model: keras.Model, seed: int, scale: float = 1.0) -> None:
    """Give every kernel and bias non-zero random values (fan-in scaled, so activations stay O(1))."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if not layer.weights:
            continue
        kernel, bias = (np.asarray(w) for w in layer.get_weights())
        if isinstance(layer, keras.layers.Conv3DTranspose):
            fan_in = kernel.shape[-1]  # kernel == stride: each output voxel sees one input voxel's channels
        else:
            fan_in = kernel.size // kernel.shape[-1]
        k = rng.normal(0.0, scale / np.sqrt(fan_in), kernel.shape).astype(np.float32)
        b = rng.uniform(-0.5, 0.5, bias.shape).astype(np.float32)
        layer.set_weights([k, b])
