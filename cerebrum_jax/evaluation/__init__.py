"""Scores of a prediction against a reference: ``metrics`` (Dice, HD95, volumetric similarity), ``surfaces``
(marching-cubes surfaces, GIfTI, signed distances)."""
