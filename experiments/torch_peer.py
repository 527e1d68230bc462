"""The CEREBRUM-7T network in PyTorch: the benchmark's peer, loaded with cerebrum_jax parameters.

Layouts: cerebrum_jax (like Keras) stores Conv3D kernels as (d, h, w, in, out) -> torch Conv3d weight
(out, in, d, h, w); Conv3DTranspose kernels as (d, h, w, out, in) -> torch ConvTranspose3d weight
(in, out, d, h, w), i.e. ``K.transpose(4, 3, 0, 1, 2)`` (checked numerically: reproduces Keras to 1e-7).
Tensors here are (B, C, D, H, W); ``forward_probabilities`` takes and returns channels-last numpy arrays
(B, D, H, W, C) so it can be compared with ``cerebrum_jax.model.network.probabilities`` directly.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# (name, op, kernel, activation, level); the same table as cerebrum_jax.model.network.LAYERS.
_TABLE = (
    ("enc_lvl1_block1_conv", "conv", 3, "enc", 1),
    ("down_1to2_conv", "down", 4, "enc", 2),
    ("enc_lvl2_block1_conv", "conv", 3, "enc", 2),
    ("enc_lvl2_block2_conv", "conv", 3, "enc", 2),
    ("down_2to3_conv", "down", 2, "enc", 3),
    ("enc_lvl3_block1_conv", "conv", 3, "enc", 3),
    ("enc_lvl3_block2_conv", "conv", 3, "enc", 3),
    ("enc_lvl3_block3_conv", "conv", 3, "dec", 3),
    ("up_3to2_conv", "up", 2, "none", 2),
    ("dec_lvl2_block1_conv", "conv", 3, "dec", 2),
    ("dec_lvl2_block2_conv", "conv", 3, "dec", 2),
    ("up_2to1_conv", "up", 4, "none", 1),
    ("dec_lvl1_block1_conv", "conv", 3, "dec", 1),
    ("main_output", "conv", 1, "none", 1),
)


# As the original (and model.network.dropout_rate): a Dropout after every conv but these, whose rate is
# level 1's (0); up_2to1_conv's Dropout has level 2's rate although its output is at full resolution.
NO_DROPOUT = ("enc_lvl1_block1_conv", "down_1to2_conv", "dec_lvl1_block1_conv", "main_output")


def _torch_layer(op: str, k: int, kernel: np.ndarray, bias: np.ndarray) -> nn.Module:
    """One torch layer with weights copied from a Keras-layout ``kernel`` (float32) and ``bias``."""
    if op == "up":  # (d, h, w, out, in) -> (in, out, d, h, w)
        w = kernel.transpose(4, 3, 0, 1, 2)
        layer = nn.ConvTranspose3d(w.shape[0], w.shape[1], k, stride=k)
    else:  # (d, h, w, in, out) -> (out, in, d, h, w)
        w = kernel.transpose(4, 3, 0, 1, 2)
        stride, pad = (k, 0) if op == "down" else (1, k // 2)
        layer = nn.Conv3d(w.shape[1], w.shape[0], k, stride=stride, padding=pad)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(np.array(w, dtype=np.float32)))
        layer.bias.copy_(torch.from_numpy(np.array(bias, dtype=np.float32)))
    return layer


class TorchCerebrum(nn.Module):
    """(B, 1, D, H, W) -> (B, n_classes, D, H, W) logits; relu activations, dropout where the original has
    it (``NO_DROPOUT``)."""

    def __init__(self, params: dict, dropout_rate: float = 0.1):
        super().__init__()
        self.dropout_rate = dropout_rate

        def layer(name, op, k):
            return _torch_layer(op, k, np.asarray(params[name]["kernel"]), np.asarray(params[name]["bias"]))

        self.layers = nn.ModuleDict({name: layer(name, op, k) for name, op, k, *_ in _TABLE})

    def _f(self, name: str, x: torch.Tensor) -> torch.Tensor:
        _, _, _, act, _ = next(row for row in _TABLE if row[0] == name)
        y = self.layers[name](x)
        if act in ("enc", "dec"):
            y = F.relu(y)
        if name not in NO_DROPOUT and self.dropout_rate > 0:
            y = F.dropout(y, self.dropout_rate, self.training)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self._f
        lvl1 = f("enc_lvl1_block1_conv", x)
        lvl2 = f("enc_lvl2_block2_conv", f("enc_lvl2_block1_conv", f("down_1to2_conv", lvl1)))
        y = f("down_2to3_conv", lvl2)
        y = f("enc_lvl3_block3_conv", f("enc_lvl3_block2_conv", f("enc_lvl3_block1_conv", y)))
        y = f("up_3to2_conv", y) + lvl2
        y = f("dec_lvl2_block2_conv", f("dec_lvl2_block1_conv", y))
        y = f("up_2to1_conv", y) + lvl1
        return self.layers["main_output"](f("dec_lvl1_block1_conv", y))


def forward_probabilities(net: TorchCerebrum, x: np.ndarray, bf16: bool = False) -> np.ndarray:
    """Softmax probabilities (B, D, H, W, C) float32 of channels-last ``x`` (B, D, H, W, 1), eval mode
    (``bf16``: under ``torch.autocast("cpu", torch.bfloat16)``)."""
    net.eval()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = net(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 4, 1, 2, 3))))
        return torch.softmax(logits.float(), dim=1).permute(0, 2, 3, 4, 1).numpy()


def make_train_step(net: TorchCerebrum, lr: float = 5e-4, bf16: bool = False):
    """A training step (weighted cross-entropy, gradients, Adam) like cerebrum_jax's, for timing.

    Returns step(x (B, 1, D, H, W) float32 tensor, labels (B, D, H, W) int64 tensor, class_weights (C,))
    -> loss (float). ``bf16``: the forward under ``torch.autocast("cpu", torch.bfloat16)`` (bfloat16
    convolutions, float32 parameters, Adam and loss), as cerebrum_jax's ``--precision bf16``.
    """
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()

    def step(x: torch.Tensor, labels: torch.Tensor, class_weights: torch.Tensor) -> float:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = net(x)
        loss = F.cross_entropy(logits.float(), labels, weight=class_weights)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step
