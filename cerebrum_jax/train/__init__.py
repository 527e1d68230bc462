"""Training: ``losses``, ``augment`` (and ``synth``), ``steps`` (the jitted train and eval steps),
``streamed`` (whole-volume steps in depth slabs), ``schedule`` (``LoopConfig``), ``loop`` (epochs),
``memory`` (does it fit).

``cerebrum_jax.train.NAME`` also reads the names of the old top-level module ``cerebrum_jax.train`` (now
``steps``), imported on first use.
"""

from cerebrum_jax._moved import forward

__getattr__ = forward(__name__, ("steps",))
