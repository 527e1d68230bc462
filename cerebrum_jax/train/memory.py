"""Will a training step fit? An estimate of its memory from the grid, classes, filters and batch, checked
against the machine before anything is allocated (a 512x512x512 grid used to end in a MemoryError
traceback after minutes of loading).
"""

from __future__ import annotations

import os

from cerebrum_jax.errors import InputError

# Bytes per voxel of a batch of one: (per level-1 filter, per class), by backend. See train_step_bytes.
BYTES_PER_VOXEL = {"cpu": (150.0, 40.0), "gpu": (16.0, 12.0)}
# The streamed step (``streamed``, level-1 layers in depth slabs) keeps only the volume, its labels and
# the 64x smaller levels 2-3 whole: a whole 256x352x224 fold (slabs of 8) peaked at 5.02 GiB RSS (267 B per
# voxel; the step's compiled temporaries are 3.7 GB of it); the low side of that (see train_step_bytes).
STREAMED_BYTES_PER_VOXEL = 240.0
SKIP_ENV = "CEREBRUM_JAX_NO_MEMORY_CHECK"


def train_step_bytes(
    grid,
    n_classes: int,
    n_filters: int,
    batch_size: int = 1,
    *,
    n_devices: int = 1,
    backend: str = "cpu",
    bytes_per_voxel: float | None = None,
    streamed: bool = False,
) -> float:
    """Estimated peak bytes of one whole-volume training step (forward, backward, Adam) on ``grid``
    (D, H, W) voxels: per device on a GPU (``n_devices`` share the batch and depth), in all on a CPU
    (virtual CPU devices share one RAM, so ``n_devices`` does not divide it there).

    Formula: voxels x batch_size x bytes_per_voxel, with bytes_per_voxel = F x n_filters + C x n_classes
    (F, C = ``BYTES_PER_VOXEL[backend]``) unless given: the full-resolution level-1 activations (n_filters
    channels) and their gradients dominate; the logits, softmax and loss add a few n_classes-channel
    buffers per voxel.

    Calibration, XLA:CPU (``jax.jit(train.make_train_step(...), donate_argnums=0).lower(...).compile()
    .memory_analysis()``: arguments + outputs + temporaries, float32, batch 1, n_filters 24, 8 classes, no
    remat; 2-core CPU): 32x32x32 5,472 B per voxel, 64x32x32 4,919, 64x64x32 4,659 (the fixed 15 MB of
    parameters and Adam state matter less as the grid grows); and BENCHMARKS.md's whole-volume step,
    256x352x224 with remat, for which XLA:CPU asked 93.99 GB = 4,657 B per voxel. The CPU figure
    F = 150, C = 40 gives 3,920 B per voxel for that model: about 84 % of the measured, on the low side so
    that it refuses only steps that cannot fit. GPU: unmeasured here (no GPU was lent); F = 16, C = 12
    (four float32 buffers per filter channel, three per class) is a lower bound of any backward pass, so
    a GPU is refused only a grid that certainly cannot fit; measure and raise it when a GPU is available.
    ``streamed``: the step that streams the full-resolution layers in depth slabs (``streamed``) keeps
    the input, labels, augmentation buffers and the levels 2-3 whole (1/64 and 1/512 of the voxels):
    ``STREAMED_BYTES_PER_VOXEL`` (240 B, 4.8 GB for 256x352x224, where a whole fold peaked at 5.02 GiB RSS
    on the 2-core CPU with slabs of 8), whatever the filters and classes.
    """
    voxels = 1
    for g in grid:
        voxels *= int(g)
    if bytes_per_voxel is None and streamed:
        bytes_per_voxel = STREAMED_BYTES_PER_VOXEL
    if bytes_per_voxel is None:
        per_filter, per_class = BYTES_PER_VOXEL["cpu" if backend == "cpu" else "gpu"]
        bytes_per_voxel = per_filter * n_filters + per_class * n_classes
    share = 1 if backend == "cpu" else max(int(n_devices), 1)
    return voxels * batch_size * float(bytes_per_voxel) / share


def device_memory_bytes() -> tuple[int | None, str, str]:
    """(bytes one device can hold, what that is, backend): a GPU's ``bytes_limit`` from ``memory_stats()``
    when the backend reports one, else the host's physical RAM (``os.sysconf``); None when unknown."""
    import jax

    device = jax.devices()[0]
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        if stats.get("bytes_limit"):
            return int(stats["bytes_limit"]), f"the {device.device_kind}'s memory", device.platform
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's RAM", "cpu"
    except (ValueError, OSError, AttributeError):
        return None, "unknown", device.platform


def mesh_devices(mesh: str | None) -> int:
    """The number of devices of a "DATAxSPACE" mesh string (1 for None or anything malformed)."""
    n = 1
    for part in str(mesh or "1").lower().split("x"):
        n *= int(part) if part.isdigit() and int(part) > 0 else 1
    return n


def check_training_fits(
    runtime, batch_size: int, grid, n_classes: int, n_filters: int, *, bytes_per_voxel=None
) -> float | None:
    """InputError naming --grid when ``train_step_bytes`` for ``runtime`` (``config.RuntimeConfig``: mesh,
    slab_rows) and ``batch_size`` on ``grid`` exceeds ``device_memory_bytes``; returns the estimate (None
    when ``grid`` is None, i.e. not known yet, or when the environment variable CEREBRUM_JAX_NO_MEMORY_CHECK
    is set to skip the check)."""
    if grid is None or os.environ.get(SKIP_ENV):
        return None
    have, what, backend = device_memory_bytes()
    slab_rows = runtime.slab_rows
    if slab_rows is None:  # automatic (``streamed.auto_slab_rows``), as finetune resolves it
        from cerebrum_jax.train.streamed import auto_slab_rows

        slab_rows = 0 if runtime.mesh else auto_slab_rows(tuple(grid))
    need = train_step_bytes(
        grid,
        n_classes,
        n_filters,
        batch_size,
        n_devices=mesh_devices(runtime.mesh),
        backend=backend,
        bytes_per_voxel=bytes_per_voxel,
        streamed=slab_rows > 0,
    )
    step = f"streamed in slabs of {slab_rows} rows" if slab_rows else "plain step"
    if have is not None and need > have:
        raise InputError(
            f"{'x'.join(map(str, grid))}: a training step needs about {need / 1e9:.1f} GB "
            f"(estimate for {n_classes} classes, n_filters {n_filters}, batch {batch_size}, {step}), "
            "more than "
            f"{what} ({have / 1e9:.1f} GB); use a smaller grid or a coarser --set voxel_mm "
            f"(set {SKIP_ENV}=1 to try anyway)",
            "--grid",
        )
    return need
