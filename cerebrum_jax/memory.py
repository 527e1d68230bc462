"""Will a training step fit? An estimate of its memory from the grid, classes, filters and batch, checked
against the machine before anything is allocated (a 512x512x512 grid used to end in a MemoryError
traceback after minutes of loading).
"""

from __future__ import annotations

import os

from cerebrum_jax.errors import InputError

# Bytes per voxel of a batch of one, per filter of level 1 (n_filters) and per class, of one compiled
# whole-volume training step (forward, backward, Adam update) on XLA:CPU. Calibration: see
# ``train_step_bytes``.
BYTES_PER_VOXEL_FILTER = 150.0
BYTES_PER_VOXEL_CLASS = 40.0
SKIP_ENV = "CEREBRUM_JAX_NO_MEMORY_CHECK"


def train_step_bytes(
    grid,
    n_classes: int,
    n_filters: int,
    batch_size: int = 1,
    *,
    n_devices: int = 1,
    bytes_per_voxel: float | None = None,
    streamed: bool = False,
) -> float:
    """Estimated peak bytes per device of one training step on a ``grid`` (D, H, W) voxels.

    Formula: voxels x batch_size / n_devices x bytes_per_voxel, with bytes_per_voxel =
    BYTES_PER_VOXEL_FILTER x n_filters + BYTES_PER_VOXEL_CLASS x n_classes unless given. The level-1
    activations (n_filters channels at full resolution) and their gradients dominate; the output and
    loss add a few buffers of n_classes channels per voxel.

    Calibration (XLA:CPU ``compiled.memory_analysis()``, arguments + outputs + temporaries, of
    ``train.make_train_step`` jitted with donation, float32, batch 1): see BENCHMARKS.md "Memory of a
    training step"; and the whole-volume figure of BENCHMARKS.md, a 256x352x224 grid with 8 classes and
    n_filters 24 for which XLA:CPU asked for 94.0 GB (4,657 B per voxel; this formula: 3,920, kept on
    the low side so that it never refuses a step that fits). ``streamed``: a step that streams the
    volume through the network in slabs (not built yet) will need less; until it is measured it gets
    the same figure, and a caller that knows better passes ``bytes_per_voxel``.
    """
    voxels = 1
    for g in grid:
        voxels *= int(g)
    if bytes_per_voxel is None:
        bytes_per_voxel = BYTES_PER_VOXEL_FILTER * n_filters + BYTES_PER_VOXEL_CLASS * n_classes
    del streamed  # no streamed step yet: same figure (see the docstring)
    return voxels * batch_size / max(n_devices, 1) * float(bytes_per_voxel)


def device_memory_bytes() -> tuple[int | None, str]:
    """(bytes one device can hold, what that is): a GPU's ``bytes_limit`` from ``memory_stats()`` when the
    backend reports one, else the host's physical RAM (``os.sysconf``); (None, why) when neither is known."""
    import jax

    device = jax.devices()[0]
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        if stats.get("bytes_limit"):
            return int(stats["bytes_limit"]), f"{device.device_kind} memory"
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's RAM"
    except (ValueError, OSError, AttributeError):
        return None, "unknown"


def check_training_fits(cfg, grid, n_classes: int, n_filters: int, *, bytes_per_voxel=None) -> float | None:
    """InputError naming --grid when ``train_step_bytes`` for ``cfg`` (batch_size, mesh) on ``grid`` exceeds
    ``device_memory_bytes``; returns the estimate (None when ``grid`` is None, i.e. not known yet, or the
    environment variable CEREBRUM_JAX_NO_MEMORY_CHECK is set to skip the check)."""
    if grid is None or os.environ.get(SKIP_ENV):
        return None
    n_devices = 1
    if getattr(cfg, "mesh", None):
        n_devices = 1
        for part in str(cfg.mesh).lower().split("x"):
            n_devices *= int(part) if part.isdigit() else 1
    need = train_step_bytes(
        grid, n_classes, n_filters, cfg.batch_size, n_devices=n_devices, bytes_per_voxel=bytes_per_voxel
    )
    have, what = device_memory_bytes()
    if have is not None and need > have:
        raise InputError(
            f"{'x'.join(map(str, grid))}: a training step needs about {need / 1e9:.1f} GB per device "
            f"(estimate for {n_classes} classes, n_filters {n_filters}, batch {cfg.batch_size}), more than "
            f"{what} ({have / 1e9:.1f} GB); use a smaller grid or a coarser --set voxel_mm "
            f"(set {SKIP_ENV}=1 to try anyway)",
            "--grid",
        )
    return need
