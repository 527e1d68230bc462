"""Multi-process (multi-host) runs on JAX's own multi-controller runtime (``jax.distributed``).

Every process runs the same command with ``--distributed``; ``initialize`` connects them before any JAX
backend exists, the cluster found by JAX itself (SLURM, Open MPI, Kubernetes and the other methods of
``jax.distributed.initialize``) or given explicitly (``--coordinator HOST:PORT --num-processes N
--process-id I``). ``jax.devices()`` then lists the devices of every process, so ``sharding.make_mesh``
builds one ("data", "space") mesh over all of them, with the same meaning as on one machine. On CPU
the processes exchange data through gloo collectives.

Data: where the mesh's "data" axis spans processes, each group of processes along it reads and prepares
only its own share of the training subjects (``shares``, ``rows_by_process``) and validates only its
share's validation subjects; what needs every subject (the automatic grid, the voxelwise normalisation
volumes, class weights, validation metrics) is combined from the processes' parts (``gather_rows``,
``sum_over_processes``). Otherwise (one share) every process reads every subject, whole: any may land in
any batch row. What reaches the devices is process-local (``put_batch``): a process augments only the
batch rows its devices hold (``local_rows``) and hands JAX only the depth box of them its devices hold
(``local_part`` -> ``from_local``, i.e. ``jax.make_array_from_process_local_data``); no batch crosses
hosts. The test prediction runs on process 0 alone, or, on a 1xN mesh, split over every process and
gathered.

Roles: process 0 writes the run's files (logs, progress, metrics, figures, predictions, reports,
``checkpoints/best``); the others log to ``RUN/log.process-I.txt`` only. ``checkpoints/last`` is one
Orbax multi-process checkpoint that every process saves and restores (``save_state``). The run
directory must be on a file system every process sees, as Orbax's multi-process checkpoints need.

Failures: a collective with a dead peer fails at once, and ``guarded`` turns that error, and any other,
into one line and exits the process without waiting for the others. A process outside a collective is
ended by JAX itself (SIGABRT, status 134) once the coordination service misses the dead one's heartbeat
(``--heartbeat-timeout``), and so is a start where not every process joins within ``--init-timeout``.
No process hangs.
"""

from __future__ import annotations

import functools
import os
import socket
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np

from cerebrum_jax.errors import InputError, Terminated, first_line, one_line

LAUNCH_KEYS = ("coordinator", "num_processes", "process_id")


# ----------------------------------------------------------------------------------------------------------
# Start-up


def wanted(args, config_value: bool = False) -> bool:
    """Whether this run is distributed: --distributed, an explicit --coordinator, or the config's key."""
    return bool(getattr(args, "distributed", None) or getattr(args, "coordinator", None) or config_value)


def initialize(args) -> None:
    """``jax.distributed.initialize`` with the launch options of ``args`` (attributes named as the options
    of ``cli.options.add_distributed_args``: coordinator, num_processes, ...); must run before any backend.

        Explicit launch: --coordinator, --num-processes and --process-id together (in a Kubernetes
        Indexed Job --process-id defaults to JOB_COMPLETION_INDEX: ``launch_options``); otherwise JAX
        detects the cluster. Raises InputError (one line, exit 2) on incomplete options or when no
        cluster is found, or, for a process other than 0, when the coordinator cannot be reached within
        --init-timeout (``wait_for_coordinator``: JAX itself aborted with a C++ stack trace). When not
        every process joins process 0 within --init-timeout, JAX aborts process 0 (DEADLINE_EXCEEDED).
    """
    given = launch_options(args)
    if any(v is not None for v in given.values()) and any(v is None for v in given.values()):
        missing = [f"--{k.replace('_', '-')}" for k, v in given.items() if v is None]
        raise InputError(f"an explicit launch needs {', '.join(missing)} too", "--coordinator")
    n, i = given["num_processes"], given["process_id"]
    if n is not None and n < 1:
        raise InputError(f"must be at least 1, got {n}", "--num-processes")
    if n is not None and not 0 <= i < n:
        raise InputError(f"must be in 0..{n - 1}, got {i}", "--process-id")
    for name in ("init_timeout", "heartbeat_timeout"):
        if getattr(args, name, 1) <= 0:
            raise InputError("must be a positive number of seconds", f"--{name.replace('_', '-')}")
    if given["coordinator"] and i:
        wait_for_coordinator(given["coordinator"], args.init_timeout)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU backend: collectives over TCP
    try:
        jax.distributed.initialize(
            given["coordinator"],
            given["num_processes"],
            given["process_id"],
            initialization_timeout=int(args.init_timeout),
            heartbeat_timeout_seconds=int(args.heartbeat_timeout),
            shutdown_timeout_seconds=int(args.heartbeat_timeout),
        )
    except (RuntimeError, ValueError) as e:  # no cluster detected, coordinator unreachable, ...
        hint = "" if given["coordinator"] else launch_hint()
        message = f"cannot start the distributed run: {first_line(e)}{hint}"
        raise InputError(message, "--distributed") from None


def wait_for_coordinator(address: str, timeout_s: float, interval_s: float = 0.5) -> None:
    """Return once ``address`` ("HOST:PORT", process 0's coordination service) accepts a TCP connection;
    InputError naming it when it does not within ``timeout_s`` seconds. Retried meanwhile: process 0
    may start later, and a Kubernetes headless service's name resolves only once its pod runs."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=max(interval_s, 1.0)):
                return
        except OSError as e:  # refused, unresolvable host, unreachable network, timeout
            reason = e.strerror or type(e).__name__
        if time.monotonic() + interval_s > deadline:
            raise InputError(
                f"cannot reach the coordinator (process 0) within {timeout_s:g} s ({reason}); is process 0 "
                "running there, and is the address right?",
                address,
            )
        time.sleep(interval_s)


def launch_options(args, env=None) -> dict:
    """{coordinator, num_processes, process_id} from ``args``; in a Kubernetes Indexed Job
    (``JOB_COMPLETION_INDEX`` in ``env``, default os.environ) an explicit launch without --process-id
    takes the pod's index. InputError when that index is not an integer."""
    env = os.environ if env is None else env
    given = {k: getattr(args, k, None) for k in LAUNCH_KEYS}
    index = env.get("JOB_COMPLETION_INDEX")
    if given["coordinator"] is not None and given["process_id"] is None and index is not None:
        try:
            given["process_id"] = int(index)
        except ValueError:
            raise InputError(f"JOB_COMPLETION_INDEX={index!r} is not an integer", "--process-id") from None
    return given


def launch_hint(env=None) -> str:
    """What to do when JAX found no cluster, for its error line: on Kubernetes (``KUBERNETES_SERVICE_HOST``
    in ``env``) JAX detects the Job only with the ``kubernetes`` package and a service account that may
    list the Job's pods; else, or anywhere, the explicit options."""
    env = os.environ if env is None else env
    if "KUBERNETES_SERVICE_HOST" in env:
        return (
            " (Kubernetes: JAX finds the Job's pods only with pip install 'jax[k8s]' and a service account "
            "allowed to list them; else give --coordinator JOB-0.JOB:PORT --num-processes N, and the "
            "process id comes from JOB_COMPLETION_INDEX)"
        )
    return " (no cluster detected: give --coordinator, --num-processes, --process-id)"


def is_running() -> bool:
    """Whether ``jax.distributed`` has been initialized in this process."""
    return jax.distributed.is_initialized()


def process_index() -> int:
    return jax.process_index() if is_running() else 0


def process_count() -> int:
    return jax.process_count() if is_running() else 1


def is_main() -> bool:
    """True on process 0 (and in a single-process run): the process that writes the run's files."""
    return process_index() == 0


def log_name() -> str:
    """The log file of this process in a run directory: log.txt (process 0), log.process-I.txt."""
    return "log.txt" if is_main() else f"log.process-{process_index()}.txt"


def describe() -> str:
    """'process I of N, D local / G global devices' for the logs."""
    return (
        f"process {process_index()} of {process_count()}, {jax.local_device_count()} local / "
        f"{jax.device_count()} global devices"
    )


# ----------------------------------------------------------------------------------------------------------
# Failures


def guarded(command: str) -> Callable:
    """Decorator for a CLI ``run(args)``: in a distributed run, any exception becomes one line on stderr
    naming this process, and the process exits at once (status 2 for bad input, 1 otherwise) instead of
    waiting at JAX's shutdown barrier for processes that may be gone. Single-process runs are unchanged."""

    def wrap(run: Callable) -> Callable:
        @functools.wraps(run)
        def guarded_run(args):
            try:
                return run(args)
            except BaseException as e:
                if not is_running():
                    raise
                exit_now(command, e)

        return guarded_run

    return wrap


def exit_now(command: str, e: BaseException) -> None:
    """Print ``e`` as one line naming this process and ``os._exit`` (no shutdown barrier, no hang)."""
    who = f"process {process_index()} of {process_count()}"
    if isinstance(e, KeyboardInterrupt):  # Ctrl-C, or SIGTERM (Terminated)
        code, what = (143, "terminated") if isinstance(e, Terminated) else (130, "interrupted")
    elif isinstance(e, InputError):  # our own one-line message: whole (a file name may hold a newline)
        code, what = 2, str(e)
    elif isinstance(e, OSError):
        code, what = 2, first_line(e)
    elif type(e).__name__ in ("JaxRuntimeError", "XlaRuntimeError"):
        code = 1
        what = f"lost another process (a collective or the coordination service failed): {first_line(e)}"
    else:
        code, what = 1, f"{type(e).__name__}: {first_line(e)}"
    sys.stdout.flush()
    print(one_line(f"cerebrum-jax {command}: error: {who}: {what}"), file=sys.stderr, flush=True)
    os._exit(code)


def barrier(name: str) -> None:
    """Wait until every process got here (a collective over all devices: a dead process makes it fail,
    not hang). No-op in a single-process run."""
    if process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def main_first(fn: Callable, *args):
    """``fn(*args)`` on process 0 first, then (e.g. to find what it built) on the others."""
    if not is_main():
        barrier("main first")
    result = fn(*args)
    if is_main():
        barrier("main first")
    return result


def main_result(path: Path) -> dict:
    """On processes > 0: wait until process 0 has written the JSON file ``path`` (it then calls
    ``barrier("main result")``) and return its content."""
    import json

    barrier("main result")
    return json.loads(Path(path).read_text())


def agree(check: Callable[[], None]) -> None:
    """Run ``check`` (raises InputError on bad input) on every process, then agree: if it failed on any
    process, every process raises (the failing one its own error, the others one naming it), so no
    process starts work the others will not join."""
    error = None
    try:
        check()
    except InputError as e:
        error = e
    if process_count() > 1:
        from jax.experimental import multihost_utils

        failed = np.asarray(multihost_utils.process_allgather(np.int32(error is not None)))
        if error is None and failed.any():
            bad = [int(i) for i in np.flatnonzero(failed)]
            raise InputError(
                f"the input check failed on process(es) {bad}: see their messages", "--distributed"
            )
    if error is not None:
        raise error


# ----------------------------------------------------------------------------------------------------------
# Data across processes


def share(items: Sequence, index: int | None = None, count: int | None = None) -> list:
    """This process's share of ``items`` (round robin: items I, I+N, I+2N, ...)."""
    index = process_index() if index is None else index
    count = process_count() if count is None else count
    return list(items[index::count])


def unique_names(items: Sequence, name_of: Callable) -> None:
    """InputError naming the second of two ``items`` with one output name ``name_of(item)``."""
    seen = {}
    for item in items:
        name = name_of(item)
        if name in seen:
            raise InputError(f"has the same output name {name!r} as {seen[name]}", item)
        seen[name] = item


def local_bounds(global_shape: tuple[int, ...], sharding) -> tuple[slice, ...]:
    """The box (one slice per axis) of a ``global_shape`` array that this process's devices hold under
    ``sharding``: what the process has to read to build its part (``from_local``)."""
    starts, stops = [None] * len(global_shape), [None] * len(global_shape)
    for index in sharding.addressable_devices_indices_map(tuple(global_shape)).values():
        for a, (s, n) in enumerate(zip(index, global_shape, strict=True)):
            lo, hi, _ = s.indices(n)
            starts[a] = lo if starts[a] is None else min(starts[a], lo)
            stops[a] = hi if stops[a] is None else max(stops[a], hi)
    return tuple(slice(lo, hi) for lo, hi in zip(starts, stops, strict=True))


def from_local(local, sharding, global_shape: tuple[int, ...]) -> jax.Array:
    """A global array of ``global_shape`` from this process's part ``local`` (its ``local_bounds`` box;
    numpy, or a jax array on a local device) on every process: ``jax.make_array_from_process_local_data``;
    nothing else crosses hosts."""
    local = local if isinstance(local, jax.Array) else np.asarray(local)
    return jax.make_array_from_process_local_data(sharding, local, tuple(global_shape))


def local_rows(batch_size: int, mesh) -> slice:
    """The rows of a global batch of ``batch_size`` (B over the mesh's "data" axis) that this process's
    devices hold: all of them in one process, or when "data" does not span processes."""
    return rows_by_process(batch_size, mesh)[process_index()]


def local_part(rows, sharding, global_shape: tuple[int, ...]):
    """What this process hands JAX of a (B, D, ...) batch array: ``rows`` (its ``local_rows``, already
    picked) cut to the depth box of ``local_bounds``; shape (rows, box depth, H, W[, 1])."""
    box = local_bounds(tuple(global_shape), sharding)
    return rows[(slice(None), *box[1:])]


def put_batch(local: dict, mesh, batch_size: int) -> dict:
    """Global arrays of a training or validation batch on ``mesh`` from this process's part only.

    local: {"image" (b, D, H, W, 1), "labels" (b, D, H, W), "class_weights" (C,)}, the b rows
    ``local_rows(batch_size, mesh)`` of the global batch (numpy or on a local device).
    Of image and labels each process hands JAX only the depth box its own devices hold
    (``local_part`` -> ``from_local``); the class weights are replicated. One process:
    ``sharding.put_batch`` of the whole batch (there b == batch_size).
    """
    from cerebrum_jax.parallel import sharding

    if process_count() == 1:
        return sharding.put_batch(local, mesh)
    sharding.check_divisible((batch_size, *local["image"].shape[1:]), mesh)
    shardings, out = sharding.batch_shardings(local, mesh), {}
    for name, x in local.items():
        if name in ("image", "labels", "skeleton"):
            shape = (batch_size, *x.shape[1:])
            out[name] = from_local(local_part(x, shardings[name], shape), shardings[name], shape)
        else:
            out[name] = to_global(np.asarray(x), shardings[name])
    return out


def to_global(host: np.ndarray, sharding) -> jax.Array:
    """A global array from a host array every process holds: each process transfers only the slices
    its own devices hold (``jax.make_array_from_callback``)."""
    host = np.asarray(host)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def rows_by_process(batch_size: int, mesh) -> dict[int, slice]:
    """{process: the rows of a global batch of ``batch_size`` its devices hold} on ``mesh`` (B over
    "data"; None: one process, every row), for every process of the run."""
    if mesh is None:
        return {process_index(): slice(0, batch_size)}
    from cerebrum_jax.parallel import sharding

    shape, rows = (batch_size, mesh.shape["space"], 1, 1, 1), {}
    for d, index in sharding.volume_sharding(mesh).devices_indices_map(shape).items():
        lo, hi, _ = index[0].indices(batch_size)
        was = rows.get(d.process_index, (lo, hi))
        rows[d.process_index] = (min(was[0], lo), max(was[1], hi))
    return {p: slice(lo, hi) for p, (lo, hi) in rows.items()}


def gather_rows(values: dict[int, np.ndarray], n: int, shape: tuple[int, ...] = ()) -> np.ndarray:
    """The (n, *shape) float64 table whose row i comes from the first process that has ``values[i]``
    (every process passes the rows it has, maybe none; each row must be somewhere): small per-subject
    facts (shapes, voxel sizes, class counts, validation metrics) combined across processes."""
    table, have = np.zeros((n, *shape)), np.zeros(n, bool)
    for i, v in values.items():
        table[i], have[i] = v, True
    if process_count() > 1:
        from jax.experimental import multihost_utils

        tables = allgather_float64(table)
        haves = np.asarray(multihost_utils.process_allgather(have))
        table, have = tables[haves.argmax(axis=0), np.arange(n)], haves.any(axis=0)
    if not have.all():
        raise ValueError(f"rows {np.flatnonzero(~have).tolist()} are on no process")
    return table


def sum_over_processes(x: np.ndarray, slab: int = 16) -> np.ndarray:
    """The sum of every process's float64 array ``x`` (same shape everywhere), exchanged ``slab`` rows
    of the first axis at a time (a volume is not held once per process at once)."""
    x = np.asarray(x, np.float64)
    if process_count() == 1:
        return x
    return np.concatenate([allgather_float64(x[i : i + slab]).sum(axis=0) for i in range(0, len(x), slab)])


def allgather_float64(x: np.ndarray) -> np.ndarray:
    """(processes, *x.shape) float64: every process's ``x``, bit for bit (sent as uint32 pairs:
    ``process_allgather`` would pass float64 through JAX's default float32)."""
    from jax.experimental import multihost_utils

    x = np.ascontiguousarray(np.atleast_1d(np.asarray(x, np.float64)))
    words = np.asarray(multihost_utils.process_allgather(x.view(np.uint32)))
    return np.ascontiguousarray(words).view(np.float64).reshape(-1, *x.shape)


def local_copy(tree, device=None):
    """``tree`` with every replicated global array as this process's own copy on ``device`` (default
    its first local device): for work one process does on its own devices (validating its share)."""
    device = device or jax.local_devices()[0]

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            x = x.addressable_data(0)
        return jax.device_put(x, device)

    return jax.tree_util.tree_map(one, tree)


def gather(x) -> np.ndarray:
    """The whole of ``x`` on this host as numpy: local or fully replicated arrays directly, sharded
    global arrays through an all-gather (only for what must be written)."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


# ----------------------------------------------------------------------------------------------------------
# Orbax checkpoints every process saves


def shared_tmp_dir(path: Path) -> Path:
    """A temporary directory beside ``path`` with one name on every process (process 0 clears it)."""
    tmp = path.parent / f".{path.name}.partial"
    if is_main():
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(f"tmp {tmp}")
    return tmp


def save_state(path: Path, state, extra_files: dict[str, str]) -> None:
    """Orbax multi-process save of ``state`` (global arrays) to PATH/state by every process, the
    ``extra_files`` {name: text, or a function of the saved state/ directory giving the text (a digest of
    it)} written by process 0, then swapped into place by process 0."""
    import orbax.checkpoint as ocp

    from cerebrum_jax import fsafe

    path = Path(path).absolute()
    if is_main():
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = shared_tmp_dir(path)
    with ocp.StandardCheckpointer() as ckptr:  # every process writes its shards; process 0 the metadata
        ckptr.save(tmp / "state", state)
        ckptr.wait_until_finished()
    if is_main():
        for name, text in extra_files.items():
            (tmp / name).write_text(text(tmp / "state") if callable(text) else text)
        fsafe.replace_dir(tmp, path)
    barrier(f"saved {path}")


def restore_state(path: Path, like_state):
    """Orbax restore of PATH/state by every process, shaped like ``like_state``: global arrays come back
    with their shardings, anything else as host numpy arrays (a replicated state: every process reads it
    whole, so the number of processes may differ from the saving run's; ``jax.device_put`` then places
    it on a mesh, which arrays committed to one device could not cross hosts to)."""
    import orbax.checkpoint as ocp

    def target(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        return np.zeros(np.shape(x), np.asarray(x).dtype)

    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(
            Path(path).absolute() / "state", target=jax.tree_util.tree_map(target, like_state)
        )
