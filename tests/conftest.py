"""Test set-up: four virtual CPU devices (for the sharding tests) and Keras on its JAX backend.

Both must be set before jax or keras is first imported, hence here.
"""

import os

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(scope="session")
def tiny_params():
    """Random parameters of the 2-filter, 3-class network (key 0), made once per session."""
    import jax

    from cerebrum_jax.model import ModelConfig, init_params

    return init_params(ModelConfig(n_filters=2, n_classes=3), jax.random.key(0))
