"""Files and volumes, no JAX: ``nifti``, ``bids``, ``labels``, ``datasets`` (layouts, subjects, folds),
``preprocess`` (pure volume operations), ``inputs`` (the recorded ``Preprocessing``), ``skeleton`` (centre
lines), ``demo`` / ``fullsize`` (generated cohorts).

``cerebrum_jax.data.NAME`` also reads the names of the old top-level module ``cerebrum_jax.data`` (now
``datasets``), imported on first use.
"""

from cerebrum_jax._moved import forward

__getattr__ = forward(__name__, ("datasets",))
