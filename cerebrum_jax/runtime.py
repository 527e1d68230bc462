"""The process's runtime set-up that every command shares: the memory allocator, XLA:CPU's kernel
libraries and the persistent compilation cache.

**XLA:CPU's kernel libraries.** jaxlib 0.10.2 hands convolutions, matrix products, elementwise and
reduction fusions to YNNPACK by default. For this network YNNPACK's convolutions and its elementwise and
reduction fusions beat XLA's own code, and its matrix products lose to XLA's (Eigen) on the kernel
gradient's long products: ``CPU_XLA_FLAGS`` keeps the first three (training step at 64x88x56 0.64 ->
0.54 s, BENCHMARKS.md). ``configure_xla_flags`` adds it to ``XLA_FLAGS`` unless the flag is there, before
XLA starts (the command line does; scripts call it first). Programs partitioned over a device mesh compile
with convolutions only (``mesh_compiler_options``): XLA:CPU refuses the layouts that partitioning gives
some elementwise fusions ("unsupported layout in YNN fusion").

**Allocator.** XLA:CPU allocates each execution's temporary buffer as one block (1.3 GB for a training
step at 64x88x56 with 24 filters, 0.55 GB for the demo's) and frees it when the step ends. glibc's malloc
serves a block that large from a fresh ``mmap`` and returns it with ``munmap``, so every step faults in
every page of it again: 337,000 page faults and 0.5 s of system time per step at 64x88x56 on a 2-core VM,
a quarter of the CPU time. jemalloc, told to keep freed memory (``MALLOC_CONF`` = ``JEMALLOC_CONF``),
hands the same pages back to the next step: no faults after the first steps (BENCHMARKS.md). A
process cannot change its allocator once running, so the ``cerebrum-jax`` command starts itself again
with jemalloc preloaded (``LD_PRELOAD``) when the library is installed (Debian/Ubuntu ``libjemalloc2``,
conda ``jemalloc``) and not already loaded; ``CEREBRUM_JAX_ALLOCATOR=system`` keeps glibc's,
``CEREBRUM_JAX_JEMALLOC=/path/libjemalloc.so.2`` names the library. Results do not depend on it.

XLA compiles the fine-tuning step, validation and the predictor anew in every process (about 30 s for the
demo's programs on 2 CPU cores). JAX's persistent compilation cache keeps the compiled executables on
disk, keyed by the program, the devices, jaxlib and the XLA flags, so a second run of the same config
starts training in seconds. ``cerebrum-jax`` turns it on for every command:

- in ``$CEREBRUM_JAX_CACHE`` when set to a directory, else in JAX's own ``JAX_COMPILATION_CACHE_DIR``
  when set, else in the per-user ``$XDG_CACHE_HOME/cerebrum-jax/xla`` (``~/.cache/cerebrum-jax/xla``);
- off with ``CEREBRUM_JAX_CACHE=off`` (or ``cerebrum-jax --compile-cache off COMMAND``);
- at most ``MAX_BYTES`` on disk (JAX evicts the least recently used entries beyond it).

A cached executable is the one XLA would compile again: results do not depend on the cache. The library
does nothing of this on import; a script calls ``enable_compilation_cache(default_cache_dir())``.
"""

from __future__ import annotations

import ctypes.util
import importlib.util
import os
import sys
from collections.abc import Mapping
from pathlib import Path

# One arena (no copy of the step's block per thread's arena), every size in it, freed pages never returned
# to the kernel: the next step reuses them. The peak stays what the largest step needs.
JEMALLOC_CONF = "narenas:1,oversize_threshold:0,dirty_decay_ms:-1,muzzy_decay_ms:-1"
REEXEC_MARK = "CEREBRUM_JAX_REEXEC"  # set in the restarted process: never restart twice

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
CPU_XLA_FLAGS = f"{YNN_FLAG}=individual_convolution,eltwise,reduce"
OFF = ("off", "none", "0", "false", "no")
MAX_BYTES = 4 << 30  # 4 GiB: the demo's programs take ~30 MB, a full-size fold's ~100 MB
MIN_COMPILE_SECONDS = 0.5  # cache what takes this long to compile; quicker programs are not worth a file


def xla_flags(current: str) -> str:
    """``XLA_FLAGS`` with ``CPU_XLA_FLAGS`` added, unless ``current`` already sets that flag."""
    if YNN_FLAG in current:
        return current
    return f"{current} {CPU_XLA_FLAGS}".strip()


def configure_xla_flags() -> None:
    """Add ``CPU_XLA_FLAGS`` to this process's ``XLA_FLAGS`` (read when XLA starts: call it before the first
    computation)."""
    os.environ["XLA_FLAGS"] = xla_flags(os.environ.get("XLA_FLAGS", ""))


def mesh_compiler_options() -> dict[str, str]:
    """``jax.jit(..., compiler_options=)`` for a program partitioned over a mesh of CPU devices: YNNPACK
    for convolutions only (see the module docstring); nothing elsewhere."""
    import jax

    if jax.default_backend() != "cpu" or YNN_FLAG not in os.environ.get("XLA_FLAGS", ""):
        return {}
    return {YNN_FLAG.removeprefix("--"): "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"}


def default_cache_dir(env: Mapping[str, str] | None = None) -> Path | None:
    """The compilation-cache directory of this process's environment ``env`` (default os.environ), or None
    when ``CEREBRUM_JAX_CACHE`` turns it off."""
    env = os.environ if env is None else env
    chosen = env.get("CEREBRUM_JAX_CACHE", "").strip()
    if chosen.lower() in OFF:
        return None
    if chosen:
        return Path(chosen).expanduser()
    if env.get("JAX_COMPILATION_CACHE_DIR"):
        return Path(env["JAX_COMPILATION_CACHE_DIR"]).expanduser()
    base = env.get("XDG_CACHE_HOME") or os.path.join(env.get("HOME") or os.path.expanduser("~"), ".cache")
    return Path(base).expanduser() / "cerebrum-jax" / "xla"


def resolve_cache_option(value: str | None, env: Mapping[str, str] | None = None) -> Path | None:
    """``--compile-cache VALUE`` (a directory, or "off"; None: the default of ``env``) as a directory or
    None (off)."""
    if value is None:
        return default_cache_dir(env)
    return None if value.strip().lower() in OFF else Path(value).expanduser()


def enable_compilation_cache(path: Path | None) -> Path | None:
    """Turn JAX's persistent compilation cache on in ``path`` (None: turn it off); returns ``path``.

    A directory that cannot be created turns the cache off (compiling still works); the caller may say so.
    """
    import jax

    if path is not None:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError:
            path = None
    if path is None:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:  # JAX's own setting wins
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    # JAX bounds the cache under a file lock and fails every cache read without the filelock package (a
    # dependency of ours, but an environment assembled by hand may lack it): unbounded beats off
    if "JAX_COMPILATION_CACHE_MAX_SIZE" not in os.environ and importlib.util.find_spec("filelock"):
        jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    return path


def find_jemalloc(env: Mapping[str, str] | None = None) -> str | None:
    """The jemalloc shared library to preload: ``CEREBRUM_JAX_JEMALLOC`` when it names a file, else one in
    this Python's prefix (conda) or the system's library path; None when there is none (or not Linux)."""
    env = os.environ if env is None else env
    if not sys.platform.startswith("linux"):
        return None
    named = env.get("CEREBRUM_JAX_JEMALLOC")
    if named is not None:
        return named if os.path.isfile(named) else None
    for prefix in (sys.prefix, sys.base_prefix):
        candidate = os.path.join(prefix, "lib", "libjemalloc.so.2")
        if os.path.isfile(candidate):
            return candidate
    return ctypes.util.find_library("jemalloc")


def active_allocator() -> str:
    """'jemalloc' when a jemalloc library is mapped into this process (``/proc/self/maps``), else 'system'."""
    try:
        with open("/proc/self/maps") as fh:
            return "jemalloc" if "jemalloc" in fh.read() else "system"
    except OSError:
        return "system"


def allocator_env(env: Mapping[str, str], library: str | None) -> dict[str, str] | None:
    """The environment to restart this process with jemalloc preloaded, or None when that is not wanted
    (``CEREBRUM_JAX_ALLOCATOR=system``, no ``library``, already preloaded, or already restarted once)."""
    if env.get("CEREBRUM_JAX_ALLOCATOR", "").strip().lower() == "system" or library is None:
        return None
    if REEXEC_MARK in env or "jemalloc" in env.get("LD_PRELOAD", ""):
        return None
    new = dict(env)
    new["LD_PRELOAD"] = " ".join(p for p in (library, env.get("LD_PRELOAD", "")) if p)
    new.setdefault("MALLOC_CONF", JEMALLOC_CONF)  # the user's own settings win
    new[REEXEC_MARK] = "1"
    return new


def restart_with_jemalloc(command: list[str]) -> None:
    """Replace this process by ``command`` (e.g. ``[sys.executable, "-m", "cerebrum_jax", *args]``) with
    jemalloc preloaded (``allocator_env``); returns (nothing changed) when that is not wanted or the
    restart fails."""
    env = allocator_env(os.environ, find_jemalloc())
    if env is None or active_allocator() == "jemalloc":
        return
    try:
        os.execve(command[0], command, env)
    except OSError:
        return
