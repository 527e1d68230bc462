"""cerebrum-jax: CEREBRUM-7T whole-volume 7T MRI segmentation and fine-tuning in JAX.

Axis convention: arrays are (batch, D, H, W, C), channels last; NIfTI volumes are read in their
stored voxel order (i, j, k) = (D, H, W) with their affine kept alongside.
"""

from cerebrum_jax.model import Cerebrum7T, ModelConfig, apply, init_params, probabilities

__all__ = ["Cerebrum7T", "ModelConfig", "apply", "init_params", "probabilities"]
__version__ = "0.1.0"
