"""Recipes shipped with peftkit: one module per named recipe (see `peftkit ls`)."""
