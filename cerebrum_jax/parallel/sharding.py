"""Memory-sharded forward and training steps that run unchanged on 1..N devices.

A 2-D ``jax.sharding.Mesh`` with axes ("data", "space"): the batch is split along "data", the volume and
every large activation (B, D, H, W, C) along its depth axis D over "space"; parameters and optimizer state
are replicated. XLA (GSPMD) inserts the halo exchanges the 3x3x3 convolutions need at the slab borders.

``configure`` applies the performance settings (the CLI's ``--mesh``, ``--remat``, ``--precision``, added
by ``cli.options.add_performance_args``): a mesh spec such as "1x4" (1 data x 4 space devices; default all
devices on "space"), recomputation of the full-resolution blocks in the backward pass, and float32 or
bf16 compute (with float32 parameters, optimizer state, softmax and loss).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cerebrum_jax import runtime
from cerebrum_jax.choices import PRECISIONS
from cerebrum_jax.model import network as M

AXES = ("data", "space")


def parse_mesh_spec(spec: str | None, n_devices: int) -> tuple[int, int]:
    """(data, space) sizes from "DATAxSPACE" (e.g. "1x4", "2x2"); None -> (1, n_devices).

    Raises ValueError when the spec is malformed or does not use exactly ``n_devices`` devices.
    """
    if spec is None or spec == "":
        return 1, n_devices
    parts = spec.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"mesh spec must look like DATAxSPACE (e.g. 1x4), not {spec!r}")
    data, space = int(parts[0]), int(parts[1])
    if data * space != n_devices:
        raise ValueError(f"mesh {spec} needs {data * space} devices, {n_devices} available")
    return data, space


def make_mesh(spec: str | None = None, devices=None) -> Mesh:
    """A ("data", "space") mesh over ``devices`` (default: all of jax.devices()) shaped by ``spec``."""
    devices = list(jax.devices() if devices is None else devices)
    data, space = parse_mesh_spec(spec, len(devices))
    return Mesh(np.asarray(devices).reshape(data, space), AXES)


def volume_sharding(mesh: Mesh) -> NamedSharding:
    """For (B, D, H, W, C) arrays (volumes, activations, logits): B over "data", D over "space"."""
    return NamedSharding(mesh, P("data", "space"))


def labels_sharding(mesh: Mesh) -> NamedSharding:
    """For (B, D, H, W) integer label arrays: B over "data", D over "space"."""
    return NamedSharding(mesh, P("data", "space"))


def replicated(mesh: Mesh) -> NamedSharding:
    """For parameters, optimizer state, scalars and class weights: a full copy on every device."""
    return NamedSharding(mesh, P())


def check_divisible(shape: tuple[int, ...], mesh: Mesh) -> None:
    """Raise ValueError unless batch divides by the "data" size and D/8 (the coarsest level's depth)
    by the "space" size, so every level's slabs are whole voxels."""
    b, d = shape[0], shape[1]
    data, space = mesh.shape["data"], mesh.shape["space"]
    if b % data:
        raise ValueError(f"batch {b} is not divisible by the mesh's data axis ({data})")
    if (d // M.DIVISOR) % space:
        raise ValueError(f"depth {d} / {M.DIVISOR} is not divisible by the mesh's space axis ({space})")


def state_shardings(state, mesh: Mesh):
    """A pytree like ``state`` ({"params", "opt_state", "step"}) with every leaf replicated."""
    return jax.tree_util.tree_map(lambda _: replicated(mesh), state)


def batch_shardings(batch: dict, mesh: Mesh) -> dict:
    """Shardings for a batch dict: "image" (B,D,H,W,1), "labels" and "skeleton" (B,D,H,W) split, the rest
    replicated."""
    split = {
        "image": volume_sharding(mesh),
        "labels": labels_sharding(mesh),
        "skeleton": labels_sharding(mesh),
    }
    return {k: split.get(k, replicated(mesh)) for k in batch}


def jit_train_step(step: Callable, mesh: Mesh, state=None, batch=None) -> Callable:
    """jit ``step(state, batch, key) -> (state, metrics)`` for ``mesh``: state replicated and donated,
    image/labels sharded (B over "data", D over "space"), metrics replicated.

    ``state`` and ``batch`` are optional examples (arrays or ShapeDtypeStructs) fixing the pytree
    structures; without them the state sharding is a replicated prefix and the batch is assumed to be
    {"image", "labels", "class_weights"}. GSPMD propagates the input split through the model; a step that
    calls ``model.apply(..., act_sharding=activation_sharding(mesh))`` pins it on every activation.
    """
    rep = replicated(mesh)
    if batch is None:
        batch_sh = {"image": volume_sharding(mesh), "labels": labels_sharding(mesh), "class_weights": rep}
    else:
        batch_sh = batch_shardings(batch, mesh)
    state_sh = rep if state is None else state_shardings(state, mesh)
    return jax.jit(
        step,
        in_shardings=(state_sh, batch_sh, rep),
        out_shardings=(state_sh, rep),
        donate_argnums=(0,),
        compiler_options=runtime.mesh_compiler_options(),
    )


def activation_sharding(mesh: Mesh) -> NamedSharding:
    """The sharding to pass as ``model.apply(..., act_sharding=)`` inside a step jitted on ``mesh``."""
    return volume_sharding(mesh)


def put_batch(batch: dict, mesh: Mesh) -> dict:
    """``jax.device_put`` a host batch dict with ``batch_shardings`` (checks divisibility first)."""
    check_divisible(batch["image"].shape, mesh)
    return jax.device_put(batch, batch_shardings(batch, mesh))


def configure(
    config: M.ModelConfig,
    *,
    mesh: str | None = None,
    remat: bool = False,
    precision: str | None = None,
    devices=None,
) -> tuple[M.ModelConfig, Mesh]:
    """The model config with ``remat`` (or the config's own) and the compute dtype of ``precision`` (a
    ``PRECISIONS`` name; None keeps the config's), and the mesh of spec ``mesh`` over ``devices``
    (default: all of jax.devices()).

    Raises ValueError on a bad mesh spec (the CLI turns it into an InputError).
    """
    config = dataclasses.replace(
        config,
        remat=bool(remat) or config.remat,
        compute_dtype=PRECISIONS.get(precision, config.compute_dtype),
    )
    return config, make_mesh(mesh, devices)
