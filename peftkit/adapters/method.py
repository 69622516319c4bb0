"""What an adapter method is to peftkit: `AdapterMethod`, the interface each method family
implements (lora.py, ia3.py, prompt_tuning.py), and the module-name settings they share.

A method's hooks take `adapter`, the recipe's adapter section (peftkit.recipe.Lora), and some
`model`, its model section. adapters/ reads their fields but never imports peftkit.recipe:
validating a recipe needs the methods (their names, their settings' rules), so the recipe asks
this package and imports point one way, recipe -> adapters.

peft is imported inside the hooks that build or change peft objects: the recipe imports this
package, and `peftkit ls` or a typo in an override should not wait for peft, transformers and
torch to load.
"""

from __future__ import annotations

import re


class AdapterMethod:
    """One value of `adapter.method`. The defaults fit a method that peft builds from its config
    alone, trains with plain AdamW and saves as it is; a family overrides what differs."""

    name: str = ""  # the value of adapter.method
    label: str = ""  # the model card's title: "<recipe name>: <label> adapter"
    # Whether a row can hold several samples (packing.py); not when the method prepends
    # something to a whole row, as prompt tuning does its virtual tokens.
    packable: bool = True
    # What `peftkit merge` says when peft cannot fold the method into the base weights;
    # empty when it can.
    merge_refusal: str = ""

    def peft_config(self, adapter, model_type: str):
        """The peft config for `adapter` on a base of transformers `model_type`."""
        raise NotImplementedError

    def setting_problems(self, model, adapter) -> list[str]:
        """Problems with the settings this family owns, each naming its field. Asked of every
        family whatever adapter.method is: a recipe holds no malformed value, and a family may
        refuse its settings under another method."""
        return []

    def describe(self, adapter) -> str:
        """A short name of the method and its settings, e.g. 'DoRA r16' (`peftkit ls`, `show`)."""
        return self.label

    def card_summary(self, adapter) -> str:
        """The model card's first words about the adapter: 'A ... adapter'."""
        return f"A {self.describe(adapter)} adapter"

    def reads_base_at_start(self, adapter) -> bool:
        """Whether the adapter's start point is computed from the base weights (then every
        process needs them before sharding; see distributed.main_loads_alone)."""
        return False

    def initialise(self, peft_model, adapter) -> dict | None:
        """Steps after peft created the adapter layers. Returns the adapter's starting weights
        when saving needs them (see `save_adapter`), else None."""
        return None

    def make_optimizer(self, peft_model, params: list, adapter, lr: float, weight_decay: float):
        """AdamW on the adapter parameters."""
        import torch

        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    def save_adapter(self, peft_model, out, state_dict: dict | None,
                     initial: dict | None) -> None:
        """Save the adapter in PEFT format; `initial` is what `initialise` returned."""
        peft_model.save_pretrained(out, state_dict=state_dict)

    def layers_saving_activations(self, peft_model) -> list:
        """Adapter layers of the first decoder layer that keep activations of their own for
        backward, which the memory estimate counts (model/memory.py); none by default."""
        return []


def module_names(text: str) -> list[str] | None:
    """A comma-separated list of module names (None when empty)."""
    return [n.strip() for n in text.split(",") if n.strip()] or None


def target_modules(text: str) -> str | list[str]:
    """'all-linear' and regexes go to peft as a string, comma-separated names as a list."""
    text = text.strip()
    if text == "all-linear" or re.search(r"[\\^$.*+?()\[\]|]", text):
        return text
    return module_names(text) or []
