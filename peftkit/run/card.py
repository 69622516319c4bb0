"""The model card (README.md) of a run: Hub metadata, how it was trained, what it scored."""

from __future__ import annotations

import json
from pathlib import Path

from peftkit.adapters.registry import adapter_method
from peftkit.recipe.schema import Recipe
from peftkit.recipe.train_sources import parse_train


# Held-out metrics of preference runs (peftkit/training/preference.py), after the loss.
PREFERENCE_METRICS = ("preference_accuracy", "reward_margin", "rewards_chosen",
                      "rewards_rejected")
PERCENT = ("exact_match", "preference_accuracy")


def _is_hub_id(source: str) -> bool:
    return bool(source) and not source.startswith("peftkit:") and not Path(source).exists() \
        and source.count("/") == 1


def metadata(recipe: Recipe, merged: bool = False) -> str:
    """The card's YAML header. A merged model is a plain transformers model (library_name
    transformers), an adapter a peft one."""
    from huggingface_hub import ModelCardData

    from peftkit.model.sources import hub_id

    tiny = recipe.model.tiny
    card = ModelCardData(
        base_model=hub_id(recipe.model) or None,
        library_name="transformers" if merged else "peft", pipeline_tag="text-generation",
        license=recipe.hub.license or None,
        tags=["peftkit", recipe.adapter.method.replace("_", "-")]
        + (["qlora"] if recipe.model.quantize else []) + (["merged"] if merged else [])
        + (["tiny-random"] if tiny else []),
        datasets=[s.source.partition(":")[0] for s in parse_train(recipe.data.train)[0]
                  if _is_hub_id(s.source)] or None)
    return card.to_yaml()


def usage(repo_id: str = "", merged: bool = False) -> str:
    """How to load the adapter with plain peft (or the merged model with plain transformers)."""
    where = repo_id or ("PATH_OR_REPO_OF_THIS_MODEL" if merged else "PATH_OR_REPO_OF_THIS_ADAPTER")
    if merged:
        return ("```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                f'model = AutoModelForCausalLM.from_pretrained("{where}")\n'
                f'tokenizer = AutoTokenizer.from_pretrained("{where}")\n```\n')
    return ("```python\nfrom peft import PeftConfig, PeftModel\n"
            "from transformers import AutoModelForCausalLM\n\n"
            f'adapter = "{where}"\n'
            "base = AutoModelForCausalLM.from_pretrained(\n"
            "    PeftConfig.from_pretrained(adapter).base_model_name_or_path)\n"
            "model = PeftModel.from_pretrained(base, adapter)\n```\n")


def merge_section(report: dict) -> str:
    """What `peftkit merge` verified (its merge_report.json)."""
    lines = [f"The adapter was merged into the base in {report['dtype']} with `peftkit merge`"
             + (f", from an unquantized copy of the base it was trained on in "
                f"{report['dequantized_from']}" if report.get("dequantized_from") else "")
             + ", and checked on held-out tokens before saving:", ""]
    target = report.get("target")
    if target:  # a 4/8-bit run: both merge targets were measured, the closer one was used
        lines.append(f"- merge target: {target['summary']}; chosen by {target['rule']}")
    for check in report.get("checks", []):
        mark = "passed" if check["ok"] else "FAILED"
        lines.append(f"- {check['name']}: {check['summary']} ({mark})")
    return "\n".join(lines) + "\n\n"


def data_section(metrics: list[dict]) -> str:
    """The mix of training sources, as training drew it (metrics.jsonl's data record); ""
    for one source read once."""
    data = next((m for m in metrics if m.get("event") == "data"), {})
    sources = data.get("sources") or []
    if len(sources) < 2 and not any(s.get("weight") for s in sources):
        return ""
    total = sum(s["samples"] for s in sources) or 1
    rows = ["| source | weight | format | rows | samples per epoch | share |",
            "|---|---|---|---|---|---|"]
    rows += [f"| `{s['source']}` | {s['weight'] or '1x'} | {s['format']} | {s['rows']:,} | "
             f"{s['samples']:,} | {100 * s['samples'] / total:.1f}% |" for s in sources]
    return "## Training data\n\n" + "\n".join(rows) + "\n\n"


def _table(evals: dict) -> str:
    before, after = evals.get("before", {}), evals.get("after", {})
    keys = [k for k in ("eval_loss", "exact_match", *PREFERENCE_METRICS) if k in after]
    if not keys:
        return "No held-out evaluation was run.\n"
    rows = ["| metric | before training | after training |", "|---|---|---|"]
    for k in keys:
        rows.append(f"| {k} | {_fmt(k, before[k]) if k in before else '-'} | "
                    f"{_fmt(k, after[k])} |")
    return "\n".join(rows) + "\n"


def _forgetting_line(result) -> str:
    """The forgetting meter's figures (peftkit/training/forgetting.py), when it ran: a
    Forgetting from training, or its dict from result.json (eval, push)."""
    f = getattr(result, "forgetting", None)
    if not f:
        return ""
    f = f if isinstance(f, dict) else f.to_dict()
    return (f"General-text loss (forgetting meter, {f['samples']} samples of `{f['corpus']}`): "
            f"{f['before']:.4f} for the base, {f['after']:.4f} with the adapter "
            f"({100 * f['rise']:+.1f}%).\n\n")


def _fmt(key: str, value) -> str:
    if not isinstance(value, (int, float)):
        return "-"
    return f"{100 * value:.1f}%" if key in PERCENT else f"{value:.4f}"


def eval_table(evals: dict | None) -> str:
    """The results of `peftkit eval` (eval.json): the base alone and with the adapter."""
    if not evals:
        return ""
    base, adapter = evals.get("base", {}), evals.get("adapter", {})
    keys = list(dict.fromkeys([*adapter.get("metrics", {}), *base.get("metrics", {})]))
    rows = ["| metric | base model | with adapter |", "|---|---|---|"]
    rows += [f"| {k} | {_fmt(k, base.get('metrics', {}).get(k))} | "
             f"{_fmt(k, adapter.get('metrics', {}).get(k))} |" for k in keys]
    sources = sorted({f"`{e['data']}` ({e['samples']} samples)" for e in (base, adapter) if e})
    return ("### `peftkit eval`\n\n" + "\n".join(rows) + "\n\nData: " + ", ".join(sources)
            + "\n\n")


def model_card(recipe: Recipe, result, metrics: list[dict], evals: dict | None = None,
               repo_id: str = "", merge: dict | None = None) -> str:
    """The card; `evals` = eval.json (results of `peftkit eval`), when there is one;
    `repo_id` (default: hub.repo_id) goes into the usage snippet; `merge` (a
    merge_report.json) makes it the card of the merged model rather than of the adapter."""
    m, a = recipe.model, recipe.adapter
    method = adapter_method(a)
    base = (f"peftkit's tiny random-weight stand-in for `{m.name}` (same architecture, "
            "scaled down, built offline); it is not the real model" if m.tiny else f"`{m.name}`")
    peak = (getattr(result, "memory", None) or {}).get("measured", {}).get("peak_bytes")
    return (
        f"---\n{metadata(recipe, merged=merge is not None).rstrip()}\n---\n\n"
        f"# {recipe.name}: {method.label} adapter"
        + (" merged into its base" if merge is not None else "") + "\n\n"
        + method.card_summary(a) + f" for {base}, trained with "
        f"peftkit on `{recipe.data.train}`.\n\n"
        f"- trainable parameters: {result.trainable:,} of {result.total:,}\n"
        f"- optimizer steps: {result.steps}; final training loss {result.train_loss:.4f}\n"
        f"- throughput: {result.tokens_per_s:,.0f} useful tokens/s\n"
        + (f"- peak training memory: {peak / 2**20:,.0f} MiB\n" if peak else "") + "\n"
        + data_section(metrics) +
        f"## Evaluation (held-out data)\n\n{_table(result.evals)}\n{_forgetting_line(result)}"
        f"{eval_table(evals)}"
        + (f"## Merge\n\n{merge_section(merge)}" if merge is not None else "") +
        "## Training curve\n\n![loss](loss.png)\n\n"
        f"## Usage\n\n{usage(repo_id or recipe.hub.repo_id, merged=merge is not None)}\n"
        "## Recipe\n\n```json\n" + json.dumps(recipe.to_dict(), indent=2) + "\n```\n")
