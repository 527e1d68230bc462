"""The process runtime: where the compilation cache goes (and that it fills), and the jemalloc restart."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cerebrum_jax import runtime

HOME = {"HOME": "/home/u"}

# (environment, --compile-cache value, expected directory or None)
CACHE_CASES = [
    (HOME, None, "/home/u/.cache/cerebrum-jax/xla"),
    ({**HOME, "XDG_CACHE_HOME": "/xdg"}, None, "/xdg/cerebrum-jax/xla"),
    ({**HOME, "JAX_COMPILATION_CACHE_DIR": "/jaxcache"}, None, "/jaxcache"),
    ({**HOME, "CEREBRUM_JAX_CACHE": "/mine", "JAX_COMPILATION_CACHE_DIR": "/jaxcache"}, None, "/mine"),
    ({**HOME, "CEREBRUM_JAX_CACHE": "off"}, None, None),
    ({**HOME, "CEREBRUM_JAX_CACHE": "OFF"}, None, None),
    (HOME, "off", None),
    (HOME, "/opt/c", "/opt/c"),
    ({**HOME, "CEREBRUM_JAX_CACHE": "off"}, "/opt/c", "/opt/c"),  # the option wins over the environment
]


@pytest.mark.parametrize("env, option, expected", CACHE_CASES)
def test_cache_directory(env, option, expected):
    got = runtime.resolve_cache_option(option, env)
    assert got == (Path(expected) if expected else None)


def _run(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


COMPILE = (
    "import sys; from pathlib import Path; from cerebrum_jax import runtime; "
    "runtime.enable_compilation_cache(runtime.resolve_cache_option(sys.argv[1] if len(sys.argv) > 1 "
    "else None)); import jax, jax.numpy as jnp; jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((8, 8)))"
)


@pytest.mark.parametrize("setting, fills", [("DIR", True), ("off", False)])
def test_compilation_cache_fills_its_directory_or_stays_off(tmp_path, setting, fills):
    cache = tmp_path / "cache"
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env["CEREBRUM_JAX_CACHE"] = str(cache) if setting == "DIR" else "off"
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # cache even this tiny program
    result = _run(COMPILE, env)
    assert result.returncode == 0, result.stderr[-2000:]
    entries = list(cache.rglob("*")) if cache.exists() else []
    assert bool(entries) == fills


def test_unwritable_cache_directory_turns_the_cache_off(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert runtime.enable_compilation_cache(blocker / "cache") is None


LIB = "/usr/lib/libjemalloc.so.2"

# (environment, library found, expected LD_PRELOAD or None: no restart)
ALLOCATOR_CASES = [
    ({}, LIB, LIB),
    ({"LD_PRELOAD": "/x/libother.so"}, LIB, f"{LIB} /x/libother.so"),
    ({}, None, None),
    ({"CEREBRUM_JAX_ALLOCATOR": "system"}, LIB, None),
    ({"LD_PRELOAD": LIB}, LIB, None),
    ({runtime.REEXEC_MARK: "1"}, LIB, None),
]


@pytest.mark.parametrize("env, library, preload", ALLOCATOR_CASES)
def test_allocator_env(env, library, preload):
    new = runtime.allocator_env(env, library)
    if preload is None:
        assert new is None
        return
    assert new["LD_PRELOAD"] == preload
    assert new["MALLOC_CONF"] == runtime.JEMALLOC_CONF
    assert new[runtime.REEXEC_MARK] == "1"


def test_users_jemalloc_settings_are_kept():
    assert runtime.allocator_env({"MALLOC_CONF": "narenas:4"}, LIB)["MALLOC_CONF"] == "narenas:4"


def test_named_library_must_exist(tmp_path):
    assert runtime.find_jemalloc({"CEREBRUM_JAX_JEMALLOC": str(tmp_path / "missing.so")}) is None
    lib = tmp_path / "libjemalloc.so.2"
    lib.write_bytes(b"")
    assert runtime.find_jemalloc({"CEREBRUM_JAX_JEMALLOC": str(lib)}) == str(lib)


@pytest.mark.slow
@pytest.mark.parametrize("choice", ["default", "system"])
def test_command_runs_with_jemalloc_when_installed(choice):
    """The command restarts itself with jemalloc when the library is there (and not when told not to)."""
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", runtime.REEXEC_MARK)}
    if choice == "system":
        env["CEREBRUM_JAX_ALLOCATOR"] = "system"
    cmd = [sys.executable, "-m", "cerebrum_jax", "--version"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    expected = "jemalloc" if choice == "default" and runtime.find_jemalloc(env) else "system"
    assert f"memory allocator {expected}" in out.stdout


# (XLA_FLAGS before, after configure_xla_flags)
FLAG_CASES = [
    ("", runtime.CPU_XLA_FLAGS),
    (
        "--xla_force_host_platform_device_count=4",
        f"--xla_force_host_platform_device_count=4 {runtime.CPU_XLA_FLAGS}",
    ),
    (f"{runtime.YNN_FLAG}=individual_dot", f"{runtime.YNN_FLAG}=individual_dot"),  # the user's choice is kept
]


@pytest.mark.parametrize("before, after", FLAG_CASES)
def test_xla_flags(before, after):
    assert runtime.xla_flags(before) == after
    assert runtime.xla_flags(runtime.xla_flags(before)) == after  # idempotent


def test_this_suite_runs_with_the_commands_flags_and_meshes_compile_convolutions_only():
    assert runtime.CPU_XLA_FLAGS in os.environ["XLA_FLAGS"]  # tests/conftest.py
    assert runtime.mesh_compiler_options() == {
        runtime.YNN_FLAG.removeprefix("--"): "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"
    }
