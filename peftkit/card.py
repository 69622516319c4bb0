"""The model card (README.md) of a run: Hub metadata, how it was trained, what it scored."""

from __future__ import annotations

import json
from pathlib import Path

from peftkit.config import Recipe


def _is_hub_id(source: str) -> bool:
    return bool(source) and not source.startswith("peftkit:") and not Path(source).exists() \
        and source.count("/") == 1


def metadata(recipe: Recipe) -> str:
    from huggingface_hub import ModelCardData

    tiny = recipe.model.tiny
    card = ModelCardData(
        base_model=None if tiny else recipe.model.name,
        library_name="peft", pipeline_tag="text-generation",
        tags=["peftkit", "lora"] + (["qlora"] if recipe.model.quantize else [])
        + (["tiny-random"] if tiny else []),
        datasets=[recipe.data.train] if _is_hub_id(recipe.data.train) else None)
    return card.to_yaml()


def _table(evals: dict) -> str:
    before, after = evals.get("before", {}), evals.get("after", {})
    keys = [k for k in ("eval_loss", "exact_match") if k in after]
    if not keys:
        return "No held-out evaluation was run.\n"
    rows = ["| metric | before training | after training |", "|---|---|---|"]
    for k in keys:
        fmt = (lambda v: f"{100 * v:.1f}%") if k == "exact_match" else (lambda v: f"{v:.4f}")
        rows.append(f"| {k} | {fmt(before[k]) if k in before else '-'} | {fmt(after[k])} |")
    return "\n".join(rows) + "\n"


def model_card(recipe: Recipe, result, metrics: list[dict]) -> str:
    m = recipe.model
    base = (f"peftkit's tiny random-weight stand-in for `{m.name}` (same architecture, "
            "scaled down, built offline); it is not the real model" if m.tiny else f"`{m.name}`")
    usage = (
        "```python\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "from peft import PeftModel\n\n"
        "adapter = \"PATH_OR_REPO_OF_THIS_ADAPTER\"\n"
        "base = AutoModelForCausalLM.from_pretrained(\n"
        "    PeftConfig.from_pretrained(adapter).base_model_name_or_path)\n"
        "model = PeftModel.from_pretrained(base, adapter)\n"
        "```\n").replace("from peft import PeftModel", "from peft import PeftConfig, PeftModel")
    return (
        f"---\n{metadata(recipe)}---\n\n"
        f"# {recipe.name}: LoRA adapter\n\n"
        f"A LoRA adapter (r={recipe.adapter.r}, alpha={recipe.adapter.alpha:g}, targets "
        f"`{recipe.adapter.targets}`) for {base}, trained with "
        f"peftkit on `{recipe.data.train}`.\n\n"
        f"- trainable parameters: {result.trainable:,} of {result.total:,}\n"
        f"- optimizer steps: {result.steps}; final training loss {result.train_loss:.4f}\n"
        f"- throughput: {result.tokens_per_s:,.0f} useful tokens/s\n\n"
        f"## Evaluation (held-out data)\n\n{_table(result.evals)}\n"
        "## Training curve\n\n![loss](loss.png)\n\n"
        f"## Usage\n\n{usage}\n"
        "## Recipe\n\n```json\n" + json.dumps(recipe.to_dict(), indent=2) + "\n```\n")
