"""Recipes: the typed schema, command-line overrides, validation and the registry of names."""
