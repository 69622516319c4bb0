"""Recipes: the typed schema (schema.py), command-line overrides (overrides.py), validation
(validate.py) and the registry of names (registry.py).

A recipe imports its sections from here: `from peftkit.recipe import Data, Lora, Model, Recipe`.
"""

from peftkit.recipe.schema import Data, Hub, Launch, Lora, Model, Recipe, Train

__all__ = ["Data", "Hub", "Launch", "Lora", "Model", "Recipe", "Train"]
