"""The network and its files: ``spec`` (the layer table, ``ModelConfig``; no JAX), ``network`` (the Flax
module and its operations), ``lean`` (the CPU inference forward), ``checkpoint`` (Orbax checkpoints and
their record), ``keras`` (the original's .h5 both ways).

``cerebrum_jax.model.NAME`` also reads the names of the old top-level module ``cerebrum_jax.model`` (now
``network, spec``), imported on first use.
"""

from cerebrum_jax._moved import forward

__getattr__ = forward(__name__, ("spec", "network"))  # spec first: no JAX for its names
