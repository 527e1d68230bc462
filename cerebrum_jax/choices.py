"""The closed vocabularies that configs, checkpoints, inputs and the command line share, in one place.

No imports, so that the light modules (``config``, the command line) and the heavy ones (``checkpoint``,
``sharding``, ``inputs``) take them from the same home.
"""

# How a network input is normalised (``inputs.Preprocessing.normalization``, a checkpoint's record):
# z-score inside the brain mask, voxel-by-voxel with mean/std volumes, or none (raw input).
NORMALIZATIONS = ("zscore", "voxelwise", "none")
# What fine-tuning computes for a fold (``experiment.normalization.resolve_normalization``): never raw input.
FOLD_NORMALIZATIONS = ("zscore", "voxelwise")
# The config key ``normalization``: one of those, or "auto" (the initial checkpoint's).
CONFIG_NORMALIZATIONS = ("auto", *FOLD_NORMALIZATIONS)

# How a network input is masked and cropped (``inputs.Preprocessing.mask`` / ``.crop``; a checkpoint's).
MASKS = ("none", "file", "labels")
CROPS = ("none", "box")

# Convolution precision names (config key ``precision``, ``--precision``) -> ModelConfig.compute_dtype.
PRECISIONS = {"float32": "float32", "fp32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16"}
