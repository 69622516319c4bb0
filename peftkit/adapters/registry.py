"""The adapter methods by name: what `adapter.method` may be, and the one place peftkit looks a
method up. Everything that depends on the method (peft config, validation, model card, merge,
packing, optimizer, saving, memory estimate) asks the method found here.

Adding a method: a module defining an `AdapterMethod` (method.py) and one entry in METHODS;
settings it needs that the recipe lacks go into the adapter section (recipe/schema.py).
"""

from __future__ import annotations

from peftkit.adapters.ia3 import IA3
from peftkit.adapters.lora import LORA
from peftkit.adapters.method import AdapterMethod
from peftkit.adapters.prompt_tuning import PROMPT_TUNING
from peftkit.errors import UserError

# In the order `adapter.method` lists them (--help, errors) and validation asks them.
METHODS: dict[str, AdapterMethod] = {m.name: m for m in (LORA, IA3, PROMPT_TUNING)}


def method_names() -> tuple[str, ...]:
    return tuple(METHODS)


def adapter_method(adapter) -> AdapterMethod:
    """The method of the recipe's adapter section."""
    try:
        return METHODS[adapter.method]
    except KeyError:
        raise UserError(f"adapter.method={adapter.method!r}: must be one of "
                        f"{', '.join(METHODS)}") from None


def adapter_problems(model, adapter) -> list[str]:
    """Adapter settings that are malformed or cannot work together, each naming its field:
    every family checks the settings it owns, whichever method the recipe chose."""
    return [problem for method in METHODS.values()
            for problem in method.setting_problems(model, adapter)]


def describe(adapter) -> str:
    """A short name of the method, e.g. 'DoRA r16', 'IA3', 'prompt tuning (20 tokens)'."""
    return adapter_method(adapter).describe(adapter)
