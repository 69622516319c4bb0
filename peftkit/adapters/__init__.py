"""Adapter methods, one module per family, each an `AdapterMethod` (method.py) that knows its
peft config, its settings' rules, its name on the model card and what merging, packing,
optimizing and saving need:

    lora.py           method=lora: LoRA, DoRA, rsLoRA, LoRA+, PiSSA, OLoRA, LoftQ
    ia3.py            method=ia3
    prompt_tuning.py  method=prompt_tuning

registry.py finds a recipe's method by name; nothing else branches on the name.
"""
