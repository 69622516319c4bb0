"""Open a finished run directory for inference: its recipe, the base model with the adapter
(exactly as `PeftModel.from_pretrained` loads it), and the tokenizer training used."""

from __future__ import annotations

import json
from pathlib import Path

from peftkit.recipe.schema import Recipe, recipe_from_dict
from peftkit.errors import UserError
from peftkit.model.sharded import quiet_progress
from peftkit.run.rundir import RunDir

HOW = "point at a run directory written by `peftkit train` (it holds recipe.json and adapter/)"


def read_recipe(path: Path) -> tuple[Recipe, dict]:
    """(recipe, the whole recipe.json) of a run directory; UserError if missing or corrupt."""
    file = RunDir(Path(path)).recipe_file
    if not Path(path).is_dir():
        raise UserError(f"{path}: no such run directory; {HOW}")
    if not file.is_file():
        raise UserError(f"{path}: not a peftkit run (no recipe.json); {HOW}")
    try:
        doc = json.loads(file.read_text())
        return recipe_from_dict(doc["recipe"]), doc
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise UserError(f"{file}: unreadable or from an incompatible peftkit version "
                        f"({type(exc).__name__}: {exc}); retrain, or fix the file") from None


def base_of(recipe: Recipe, doc: dict) -> str:
    """Where the run's base weights are: recipe.json's base_path (a tiny form or GGUF
    conversion whose cache was cleared is made again: same seed, same file)."""
    from peftkit.model.loading import base_path

    base = doc.get("base_path") or recipe.model.name
    if base != recipe.model.name and not Path(base).is_dir():
        base = base_path(recipe.model)
    return base


def load_tokenizer(path: Path, recipe: Recipe, base: str):
    """The run's own tokenizer/ if training changed it, else the base's, prepared the way
    training prepared it (pad token, chat template)."""
    from peftkit.model import loading as modeling

    saved = RunDir(Path(path)).tokenizer
    if saved.is_dir():
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(saved)
        except (OSError, ValueError) as exc:
            raise UserError(f"{saved}: unreadable tokenizer ({exc}); retrain the run") from None
    return modeling.load_tokenizer(base, recipe.model)[0]


def load_run(path: str | Path):
    """(recipe, PeftModel in eval mode on the best device, tokenizer) of a run directory."""
    import torch
    from peft import PeftModel
    from safetensors import SafetensorError

    from peftkit.model.loading import load_model, resolve_precision

    path = Path(path)
    recipe, doc = read_recipe(path)
    adapter = RunDir(path).adapter
    if not RunDir(path).adapter_config.is_file():
        raise UserError(f"{path}: the run has no adapter/ (did training finish?); {HOW}, or "
                        "resume it with `peftkit train NAME --resume`")
    base = base_of(recipe, doc)
    tokenizer = load_tokenizer(path, recipe, base)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = resolve_precision(recipe.model, recipe.launch, device.type)
    with quiet_progress():  # a second of loading needs no bar in front of the answers
        model = load_model(base, recipe.model, precision.dtype, precision.compute_dtype,
                           device)
    model.config.use_cache = True  # inference: generation reuses keys and values
    try:
        peft_model = PeftModel.from_pretrained(model, adapter)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:
        raise UserError(f"{adapter}: cannot load the adapter ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}); the run directory "
                        "is incomplete or corrupt") from None
    if not recipe.model.quantize:  # quantized weights were loaded onto the device already
        peft_model.to(device)
    return recipe, peft_model.eval(), tokenizer
