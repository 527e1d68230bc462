"""Keras legacy HDF5 <-> cerebrum-jax parameters: the published Glasgow weights and back.

Reads these layouts (docs/DESIGN.md, *The published weights*):

* Keras 2.2.4 full model (the published ``model_trained.h5``): bytes attributes, weight names
  ``'<layer>/kernel:0'``, ``model_config`` JSON, ``optimizer_weights`` (ignored);
* Keras 3 legacy ``model.save('x.h5')``: str attributes, names ``'<layer>/kernel'``;
* weights-only files (``save_weights`` of Keras 2): ``layer_names`` at the root, no ``model_config``.

Attribute arrays over 64 KiB are split by Keras into ``name0``, ``name1``, ...; both forms are read.
Kernels keep their Keras layouts (Conv3D (d, h, w, in, out); Conv3DTranspose (d, h, w, out, in)),
which are the layouts of ``cerebrum_jax.model.network``, so conversion copies arrays bit for bit.

``write_keras_h5`` writes the Keras 2.2.4 layout (with a functional ``model_config``) that Keras
itself can load. Run as ``python -m cerebrum_jax.model.keras ARGS`` it is ``cerebrum-jax convert ARGS``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import h5py
import numpy as np

from cerebrum_jax.errors import InputError
from cerebrum_jax.fsafe import atomic_path
from cerebrum_jax.model.spec import LAYER_NAMES, LAYERS, ModelConfig, dropout_rate

# The published Glasgow model (github.com/rockNroll87q/cerebrum7t, trained_model/model_trained.h5): where it
# is and the git blob id its bytes must have.
GLASGOW_URL = (
    "https://raw.githubusercontent.com/rockNroll87q/cerebrum7t/master/trained_model/model_trained.h5"
)
GLASGOW_BLOB_ID = "0e9190e5af99584178f92486bab61d0100c8ade4"
KERAS2_VERSION = "2.2.4"
HDF5_OBJECT_HEADER_LIMIT = 64512  # bytes; Keras splits larger attribute arrays into name0, name1, ...
CONV_CLASSES = (
    "Conv1D",
    "Conv2D",
    "Conv3D",
    "Conv3DTranspose",
    "Conv2DTranspose",
    "Dense",
    "SeparableConv2D",
)
# parameters a file may declare before anything is read: the published model (n_filters 24) has 4.7 MiB,
# n_filters 256 about 0.5 GiB; a header declaring more is a broken or foreign file, not a model to load
MAX_PARAM_BYTES = 2 * 2**30


def git_blob_id(path: str | os.PathLike) -> str:
    """Git's object id of a file's bytes: sha1(b"blob <size>\\0" + bytes), hex (what GitHub lists)."""
    data = Path(path).read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def _text(value) -> str:
    return value.decode("utf8") if isinstance(value, bytes | np.bytes_) else str(value)


def _read_attr_list(group: h5py.Group, name: str) -> list[str] | None:
    """A string-list attribute, joined from Keras's chunks ``name0``, ``name1``, ...; None if absent."""
    if name in group.attrs:
        return [_text(v) for v in np.atleast_1d(group.attrs[name])]
    if f"{name}0" not in group.attrs:
        return None
    out, i = [], 0
    while f"{name}{i}" in group.attrs:
        out += [_text(v) for v in np.atleast_1d(group.attrs[f"{name}{i}"])]
        i += 1
    return out


def _weight_base(weight_name: str) -> str:
    """'enc_lvl1_block1_conv/kernel:0' -> 'kernel' (Keras 2); 'x/kernel' -> 'kernel' (Keras 3)."""
    return weight_name.rsplit("/", 1)[-1].split(":", 1)[0]


def _read_weights(root: h5py.Group, path: Path) -> dict[str, dict[str, h5py.Dataset]]:
    """{layer: {"kernel", "bias"}} datasets (not read yet) for every layer that has weights; InputError on a
    broken file."""
    layer_names = _read_attr_list(root, "layer_names")
    if layer_names is None:
        raise InputError("not a Keras model or weights file (no 'layer_names' attribute)", path)
    weights = {}
    for name in layer_names:
        if name not in root:
            raise InputError(f"layer {name!r} is listed but has no weights group", path)
        names = _read_attr_list(root[name], "weight_names") or []
        arrays = {}
        for wname in names:
            if not isinstance(root[name].get(wname), h5py.Dataset):
                raise InputError(f"layer {name!r}: weight {wname!r} is missing", path)
            arrays[_weight_base(wname)] = root[name][wname]  # read only after every shape is checked
        if arrays:
            weights[name] = arrays
    return weights


def _model_config(f: h5py.File, path: Path) -> dict | None:
    """The root ``model_config`` JSON as {layer name: layer entry}, or None in a weights-only file."""
    if "model_config" not in f.attrs:
        return None
    try:
        cfg = json.loads(_text(f.attrs["model_config"]))
        layers = cfg["config"]["layers"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise InputError(f"unreadable model_config ({type(e).__name__}: {e})", path) from None
    # every entry an object with a config object: the graph checks below read them without further ado
    if not isinstance(layers, list) or not all(
        isinstance(e, dict) and isinstance(e.get("config"), dict) for e in layers
    ):
        raise InputError("unreadable model_config: its layers must be objects with a 'config' object", path)
    return {str(entry.get("name") or entry["config"].get("name")): entry for entry in layers}


def _config_from_model_config(layers: dict, path: Path) -> ModelConfig:
    """n_filters, n_classes, activations and dropout from the layers of a model_config; checks the graph."""
    convs = {n for n, e in layers.items() if e.get("class_name") in CONV_CLASSES}
    missing = [n for n in LAYER_NAMES if n not in layers]
    extra = sorted(convs - set(LAYER_NAMES))
    if missing or extra:
        what = f"missing layers {missing}" if missing else f"unexpected layers {extra}"
        raise InputError(f"not a CEREBRUM-7T (ThreeLevelsConvUNetStridedConv) model: {what}", path)
    acts: dict[str, set] = {"enc": set(), "dec": set(), "none": set(), "softmax": set()}
    for layer in LAYERS:
        entry = layers[layer.name]
        c = entry.get("config", {})
        want_class = "Conv3DTranspose" if layer.op == "up" else "Conv3D"
        stride = 1 if layer.op == "conv" else layer.kernel
        got = (entry.get("class_name"), list(c.get("kernel_size", [])), list(c.get("strides", [])))
        if got != (want_class, [layer.kernel] * 3, [stride] * 3):
            raise InputError(
                f"not a CEREBRUM-7T model: layer {layer.name} is {got[0]} kernel {got[1]} strides {got[2]}, "
                f"expected {want_class} kernel {[layer.kernel] * 3} strides {[stride] * 3}",
                path,
            )
        acts[layer.activation].add(c.get("activation"))
    if (
        acts["none"] != {"linear"}
        or acts["softmax"] != {"softmax"}
        or len(acts["enc"]) != 1
        or len(acts["dec"]) != 1
    ):
        raise InputError(f"not a CEREBRUM-7T model: unexpected activations {acts}", path)
    rates = [e["config"].get("rate", 0.0) for e in layers.values() if e.get("class_name") == "Dropout"]
    try:
        return ModelConfig(
            n_filters=int(layers[LAYER_NAMES[0]]["config"]["filters"]),
            n_classes=int(layers["main_output"]["config"]["filters"]),
            enc_activation=acts["enc"].pop(),
            dec_activation=acts["dec"].pop(),
            dropout_rate=float(max(rates)) if rates else ModelConfig.dropout_rate,
        )
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"unsupported model_config ({e})", path) from None


def _config_from_kernels(weights: dict, path: Path) -> ModelConfig:
    """n_filters and n_classes of a weights-only file: the output channels of its first and last kernel."""
    shapes = {n: getattr(weights[n].get("kernel"), "shape", None) for n in (LAYER_NAMES[0], "main_output")}
    for name, shape in shapes.items():
        if shape is None or len(shape) != 5:
            raise InputError(f"layer {name}: kernel has shape {shape}, expected a 3-D convolution's 5", path)
    try:
        return ModelConfig(
            n_filters=int(shapes[LAYER_NAMES[0]][-1]), n_classes=int(shapes["main_output"][-1])
        )
    except ValueError as e:
        raise InputError(f"unsupported weights ({e})", path) from None


def _check_shapes(weights: dict, config: ModelConfig, path: Path) -> dict:
    """Params {layer: {"kernel", "bias"}} float32, read from the datasets of ``weights`` only after every
    layer's presence and declared shape, and their total size (``MAX_PARAM_BYTES``), are checked; InputError
    on NaN/inf values."""
    missing = [n for n in LAYER_NAMES if n not in weights]
    if missing:
        raise InputError(f"layer {missing[0]} is missing (not a CEREBRUM-7T weights file?)", path)
    extra = sorted(set(weights) - set(LAYER_NAMES))
    if extra:
        raise InputError(f"not a CEREBRUM-7T model: unexpected layers with weights {extra}", path)
    params = {}
    for name, shapes in config.param_shapes().items():
        for part, shape in shapes.items():
            got = weights[name].get(part)
            if got is None:
                raise InputError(f"layer {name}: no {part}", path)
            if got.shape != shape:
                raise InputError(f"layer {name}: {part} has shape {got.shape}, expected {shape}", path)
    n_bytes = 4 * sum(int(np.prod(s)) for shapes in config.param_shapes().values() for s in shapes.values())
    if n_bytes > MAX_PARAM_BYTES:
        raise InputError(
            f"declares {n_bytes / 2**30:.1f} GiB of parameters (n_filters {config.n_filters}), more than "
            f"{MAX_PARAM_BYTES / 2**30:.0f} GiB: not a CEREBRUM-7T model; nothing was read",
            path,
        )
    for name in config.param_shapes():
        params[name] = {part: np.asarray(weights[name][part][()], np.float32) for part in ("kernel", "bias")}
        for part, values in params[name].items():
            bad = int(values.size - np.count_nonzero(np.isfinite(values)))
            if bad:
                raise InputError(f"layer {name}: {part} holds {bad} NaN or infinite values", path)
    return params


def read_keras_h5(path: str | os.PathLike) -> tuple[dict, ModelConfig, dict]:
    """Read a Keras legacy HDF5 model or weights file of CEREBRUM-7T.

    Returns (params, config, info): params {layer_name: {"kernel", "bias"}} float32 numpy arrays in
    Keras layouts (see ``ModelConfig.param_shapes``); config inferred from ``model_config`` when the
    file has one, else from kernel shapes (activations then relu, the published model's); info
    {"keras_version", "backend", "layout": "keras2" | "keras3", "has_model_config",
    "has_optimizer_weights"}. Raises InputError naming ``path`` for anything else.
    """
    path = Path(path)
    if path.is_dir():
        raise InputError("is a directory, not an HDF5 file", path)
    if not path.exists():
        raise InputError("Keras HDF5 file does not exist", path)
    if not path.is_file():
        raise InputError("is not a regular file, not an HDF5 file", path)
    try:
        with h5py.File(path, "r") as f:
            return _read_open(f, path)
    except InputError:
        raise
    except (OSError, KeyError, ValueError, RuntimeError) as e:
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise InputError(f"not a readable HDF5 file, or truncated ({reason})", path) from None


def _read_open(f: h5py.File, path: Path) -> tuple[dict, ModelConfig, dict]:
    root = f["model_weights"] if "model_weights" in f else f
    weights = _read_weights(root, path)
    layers = _model_config(f, path)
    if layers is not None:
        config = _config_from_model_config(layers, path)
    else:
        if LAYER_NAMES[0] not in weights or "main_output" not in weights:
            raise InputError("not a CEREBRUM-7T weights file (no enc_lvl1_block1_conv / main_output)", path)
        config = _config_from_kernels(weights, path)
    params = _check_shapes(weights, config, path)
    any_names = [w for n in weights for w in (_read_attr_list(root[n], "weight_names") or [])]
    attrs = {**root.attrs, **f.attrs}
    info = {
        "keras_version": _text(attrs.get("keras_version", "unknown")),
        "backend": _text(attrs.get("backend", "unknown")),
        "layout": "keras2" if any(":" in w for w in any_names) else "keras3",
        "has_model_config": layers is not None,
        "has_optimizer_weights": "optimizer_weights" in f,
    }
    return params, config, info


# ---------------------------------------------------------------------------------------------
# Writing (Keras 2.2.4 layout)
# ---------------------------------------------------------------------------------------------


def _conv_config(name: str, layer, config: ModelConfig) -> dict:
    k = layer.kernel
    act = {"enc": config.enc_activation, "dec": config.dec_activation, "none": "linear"}.get(
        layer.activation, layer.activation
    )
    cfg = {
        "name": name,
        "trainable": True,
        "filters": config.channels(layer),
        "kernel_size": [k] * 3,
        "strides": [1 if layer.op == "conv" else k] * 3,
        "padding": "valid" if layer.name == "main_output" else "same",  # as the original
        "data_format": "channels_last",
    }
    if layer.op == "up":
        cfg["output_padding"] = None
    else:
        cfg["dilation_rate"] = [1, 1, 1]
    glorot = {
        "class_name": "VarianceScaling",
        "config": {"scale": 1.0, "mode": "fan_avg", "distribution": "normal", "seed": None},
    }
    return cfg | {
        "activation": act,
        "use_bias": True,
        "kernel_initializer": glorot,
        "bias_initializer": {"class_name": "Zeros", "config": {}},
        "kernel_regularizer": None,
        "bias_regularizer": None,
        "activity_regularizer": None,
        "kernel_constraint": None,
        "bias_constraint": None,
    }


def keras2_model_config(config: ModelConfig) -> dict:
    """The functional-model JSON (as a dict) that Keras 2.2.4 writes for this network.

    Every conv but main_output is followed by a Dropout '<layer>_dr' (rate 0 after the convs in
    ``model.LEVEL1_DROPOUT``, ``dropout_rate`` elsewhere), as in the original's model_definition.py; the
    skip connections are Add layers skip_conn_lvl2 and skip_conn_lvl1 of the Dropout outputs.
    """

    def entry(name, class_name, layer_config, *sources):
        inbound = [[[s, 0, 0, {}] for s in sources]] if sources else []
        return {"name": name, "class_name": class_name, "config": layer_config, "inbound_nodes": inbound}

    shape = {"batch_input_shape": [None, None, None, None, 1], "dtype": "float32", "sparse": False}
    entries = [entry("main_input", "InputLayer", {**shape, "name": "main_input"})]
    prev, outputs = "main_input", {}
    skips = {
        "up_3to2_conv": ("skip_conn_lvl2", "enc_lvl2_block2_conv"),
        "up_2to1_conv": ("skip_conn_lvl1", "enc_lvl1_block1_conv"),
    }
    for layer in LAYERS:
        cls = "Conv3DTranspose" if layer.op == "up" else "Conv3D"
        entries.append(entry(layer.name, cls, _conv_config(layer.name, layer, config), prev))
        prev = layer.name
        if layer.name == "main_output":
            break
        rate = dropout_rate(layer.name, config)
        drop = layer.name.removesuffix("_conv") + "_dr"
        dropout = {"name": drop, "trainable": True, "rate": rate, "noise_shape": None, "seed": None}
        entries.append(entry(drop, "Dropout", dropout, prev))
        prev = outputs[layer.name] = drop
        if layer.name in skips:
            add, other = skips[layer.name]
            entries.append(entry(add, "Add", {"name": add, "trainable": True}, outputs[other], prev))
            prev = add
    return {
        "class_name": "Model",
        "config": {
            "name": "model_1",
            "layers": entries,
            "input_layers": [["main_input", 0, 0]],
            "output_layers": [["main_output", 0, 0]],
        },
    }


def _write_attr_list(group: h5py.Group, name: str, values: list[str]) -> None:
    """A bytes-list attribute, split into name0, name1, ... over HDF5's header limit (as Keras does)."""
    data = np.array([v.encode("utf8") for v in values], dtype="S") if values else np.array([], dtype="S1")
    chunks = 1
    while data.nbytes / chunks > HDF5_OBJECT_HEADER_LIMIT:
        chunks += 1
    if chunks == 1:
        group.attrs[name] = data
    else:
        for i, part in enumerate(np.array_split(data, chunks)):
            group.attrs[f"{name}{i}"] = part


def write_keras_h5(path: str | os.PathLike, params: dict, config: ModelConfig) -> Path:
    """Write ``params`` as a Keras 2.2.4 legacy HDF5 model file at ``path`` (atomically).

    Root attrs keras_version '2.2.4', backend 'tensorflow', model_config (``keras2_model_config``);
    model_weights/<layer>/<layer>/kernel:0 and bias:0 with bytes ``weight_names``. No optimizer state.
    """
    path = Path(path)
    expected = config.param_shapes()
    for name, shapes in expected.items():
        for part, shape in shapes.items():
            got = tuple(np.shape(params[name][part]))
            if got != shape:
                raise ValueError(f"{name}/{part} has shape {got}, expected {shape} for {config}")
    model_config = keras2_model_config(config)
    names = [e["name"] for e in model_config["config"]["layers"]]
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        # np.bytes_: fixed-length byte strings, which h5py gives back as bytes (as in Keras 2.2.4 files).
        f.attrs["keras_version"] = np.bytes_(KERAS2_VERSION)
        f.attrs["backend"] = np.bytes_("tensorflow")
        f.attrs["model_config"] = np.bytes_(json.dumps(model_config))
        root = f.create_group("model_weights")
        _write_attr_list(root, "layer_names", names)
        root.attrs["backend"] = np.bytes_("tensorflow")
        root.attrs["keras_version"] = np.bytes_(KERAS2_VERSION)
        for name in names:
            group = root.create_group(name)
            wnames = [f"{name}/{part}:0" for part in ("kernel", "bias")] if name in expected else []
            _write_attr_list(group, "weight_names", wnames)
            for wname in wnames:
                group.create_dataset(wname, data=np.asarray(params[name][_weight_base(wname)], np.float32))
    return path
