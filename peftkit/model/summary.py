"""What `peftkit show` reports without loading weights: parameter counts on the meta device."""

from __future__ import annotations

import functools

from peftkit.offline import go_offline_if_unreachable
from peftkit.model.loading import attach_adapter, count_parameters
from peftkit.model.shapes import known_config
from peftkit.model.sources import gguf_config, hub_id
from peftkit.model.tiny import infer_arch, tiny_config, tokenizer_dir
from peftkit.recipe.schema import Recipe


@functools.lru_cache(maxsize=8)  # `show` asks twice (parameters, memory); the Hub lookup is slow
def base_config(recipe: Recipe):
    """(transformers config, where it came from) without downloading weights. Cached per
    recipe: treat the config as read-only."""
    from transformers import AutoConfig, AutoTokenizer

    m = recipe.model
    if m.tiny:
        tok = AutoTokenizer.from_pretrained(tokenizer_dir())
        arch = infer_arch(m.name, m.arch)
        special = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id)
        return tiny_config(arch, m.tiny_size, len(tok), special), f"tiny form ({m.tiny_size})"
    if m.gguf_file or m.name.lower().endswith(".gguf"):
        return gguf_config(m), "the GGUF file's metadata"
    if hub_id(m):  # a local directory needs no Hub
        go_offline_if_unreachable()
    try:
        return AutoConfig.from_pretrained(m.name, revision=m.revision,
                                          trust_remote_code=m.trust_remote_code), "config.json"
    except OSError:
        config = known_config(m.name)
        if config is not None:
            return config, "peftkit's table of published shapes (Hub unreachable)"
        config = gguf_config(m)
        if config is None:
            return None, "unavailable (Hub unreachable and the model is not in peftkit's table)"
        return config, "the GGUF metadata of its offline copy (Hub unreachable)"


def parameter_counts(recipe: Recipe) -> tuple[int, int, str] | None:
    """(trainable, total, source) for the recipe's model + adapter, built on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    config, source = base_config(recipe)
    if config is None:
        return None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        peft_model = attach_adapter(model, recipe.adapter)
    trainable, total = count_parameters(peft_model)
    return trainable, total, source
