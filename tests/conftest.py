"""Test set-up: four virtual CPU devices (for the sharding tests) and Keras on its JAX backend.

Both must be set before jax or keras is first imported, hence here.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
