"""Prediction: ``predictor`` (checkpoints + a raw volume -> probabilities on its grid, ensembles, the
writer), ``segment`` (the array entry)."""
