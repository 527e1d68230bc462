"""Test set-up: four virtual CPU devices (for the sharding tests), Keras on its JAX backend, and fast
compiles: one persistent XLA compilation cache for the whole test run, LLVM's optimisation off.

All must be set before jax or keras is first imported, hence here (the command lines the tests start
inherit them). Compiling is most of what the tests spend: tiny models, and many runs of the same
programs (every fold of the tiny network compiles the same steps), which JAX's in-memory cache does not
share between jitted closures. The cache: one directory per test run, shared by its pytest-xdist
workers, removed at the end; an executable comes from it only for the same program, devices and XLA
flags. ``--xla_backend_optimization_level=0``: XLA's own graph passes (fusion, layout, buffers) still
run, LLVM's code optimisation not; results differ from optimised code by float rounding only, which
every tolerance here allows, and the suite takes 9.4 min instead of 13.5 (the cache alone; 20 min
with neither) on the 2-core machine.
Optimised code is what ``make bench`` and every real run use.
"""

import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault(
    "XLA_FLAGS", "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"
)

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
RUN = os.getppid() if "PYTEST_XDIST_WORKER" in os.environ else os.getpid()  # xdist: the controller's pid
XLA_CACHE = Path(tempfile.gettempdir()) / f"cerebrum-jax-tests-xla-cache-{RUN}"
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(XLA_CACHE))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

from cerebrum_jax import runtime  # noqa: E402  (after the environment above: it imports jax)

runtime.configure_xla_flags()  # the kernel libraries every command uses, so that the tests run what users run


def pytest_sessionfinish(session):
    mine = os.environ["JAX_COMPILATION_CACHE_DIR"] == str(XLA_CACHE)  # not a directory the user chose
    if mine and not hasattr(session.config, "workerinput"):  # the controller, after its workers
        shutil.rmtree(XLA_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_params():
    """Random parameters of the 2-filter, 3-class network (key 0), made once per session."""
    import jax

    from cerebrum_jax.model.network import ModelConfig, init_params

    return init_params(ModelConfig(n_filters=2, n_classes=3), jax.random.key(0))
