"""Comparing runs read back from the store: the comparison tables of experiments and sweeps,
and whether two groups differ."""
