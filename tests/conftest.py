"""Test set-up: four virtual CPU devices (for the sharding tests), Keras on its JAX backend, and one
persistent XLA compilation cache for the whole test run.

All must be set before jax or keras is first imported, hence here. The cache: compiling is most of what
the tests spend (tiny models, many runs of the same programs: every fold of the tiny network compiles
the same steps), and JAX's in-memory cache does not outlive a jitted closure. One directory per test
run, shared by its pytest-xdist workers and the command lines they start, removed at the end; an
executable comes from it only for the same program, devices and XLA flags, so results are unchanged.
"""

import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
RUN = os.getppid() if "PYTEST_XDIST_WORKER" in os.environ else os.getpid()  # xdist: the controller's pid
XLA_CACHE = Path(tempfile.gettempdir()) / f"cerebrum-jax-tests-xla-cache-{RUN}"
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(XLA_CACHE))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


def pytest_sessionfinish(session):
    mine = os.environ["JAX_COMPILATION_CACHE_DIR"] == str(XLA_CACHE)  # not a directory the user chose
    if mine and not hasattr(session.config, "workerinput"):  # the controller, after its workers
        shutil.rmtree(XLA_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_params():
    """Random parameters of the 2-filter, 3-class network (key 0), made once per session."""
    import jax

    from cerebrum_jax.model import ModelConfig, init_params

    return init_params(ModelConfig(n_filters=2, n_classes=3), jax.random.key(0))
