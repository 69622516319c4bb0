"""`peftkit eval RUN`: score a run's adapter (or, with `base=True`, its base alone) on
held-out data, and record the result in the run directory.

Metrics: `loss` (mean next-token loss over labelled tokens, peftkit.training.evaluation.eval_loss),
`perplexity` (exp of that loss), and any metric module shipped under
peftkit/assets/metrics/<name>/<name>.py (exact_match), computed with `evaluate` on greedy
answers to the held-out prompts (peftkit.training.evaluation.exact_match generates them). Results go
to eval.json ({"adapter": ..., "base": ...}, one entry per kind, the latest kept), one
{"event": "eval_cli", ...} line in metrics.jsonl, and the model card's evaluation section.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import replace
from importlib import resources
from pathlib import Path

from peftkit.recipe.objective import PREFERENCE_OBJECTIVES
from peftkit.recipe.overrides import suggest
from peftkit.errors import UserError
from peftkit.run.rundir import RunDir

FROM_LOSS = ("loss", "perplexity")
DEFAULT_METRICS = "loss,perplexity,exact_match"


def shipped_metrics() -> list[str]:
    root = resources.files("peftkit") / "assets" / "metrics"
    return sorted(p.name for p in root.iterdir() if (p / f"{p.name}.py").is_file())


def parse_metrics(text: str) -> list[str]:
    """The requested metric names, checked against those that exist."""
    known = [*FROM_LOSS, *shipped_metrics()]
    wanted = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in wanted if m not in known]
    if unknown or not wanted:
        bad = ", ".join(f"{m!r}{suggest(m, known)}" for m in unknown) or "none given"
        raise UserError(f"--metrics: {bad}; available: {', '.join(known)}")
    return list(dict.fromkeys(wanted))


def eval_data(recipe, tokenizer, source: str = ""):
    """(examples, prompts, description): `source` read whole, else the run's own held-out set
    rebuilt exactly as training built it (data.eval, or the seeded hold-out of data.train)."""
    from peftkit.data import dataset, preference

    cfg = recipe.data
    if recipe.train.objective in PREFERENCE_OBJECTIVES:  # pairs: scored on their chosen side
        pairs = preference.held_out(cfg, tokenizer, recipe.train.seed, source)
        if not pairs:
            raise UserError(f"no held-out preference pair in {source or cfg.eval or cfg.train}; "
                            "pass --data FILE")
        return (*preference.as_examples(pairs, tokenizer),
                f"{source or cfg.eval or cfg.train} (chosen responses of the held-out pairs)")
    if source:
        # Every row of the file is held-out data, whatever the recipe's sampling settings.
        examples, prompts = dataset.build_eval(replace(cfg, format="auto"), tokenizer, source)
        return examples, prompts, source
    if cfg.eval:
        examples, prompts = dataset.build_eval(cfg, tokenizer, cfg.eval)
        return examples, prompts, cfg.eval
    _, examples, prompts, _ = dataset.build(cfg, tokenizer, recipe.train.seed)
    if not examples:
        raise UserError(f"the run holds out no eval rows (data.eval is empty and "
                        f"data.eval_size={cfg.eval_size}); pass --data FILE")
    return examples, prompts, f"{cfg.train} (held-out {cfg.eval_size} rows)"


def score(accelerator, model, tokenizer, examples, prompts, metrics: list[str],
          batch_size: int, max_new_tokens: int) -> tuple[dict, list]:
    """(metric values, sample answers) of `model` as it is (adapter enabled or not)."""
    import evaluate

    from peftkit.training.evaluation import eval_loss, exact_match, metric_path
    from peftkit.training.loss import TokenLoss

    out, samples = {}, []
    if any(m in FROM_LOSS for m in metrics):
        if not examples:
            raise UserError("no eval example has a labelled token; nothing to compute a loss on")
        loss = eval_loss(accelerator, TokenLoss(model), examples, batch_size,
                         tokenizer.pad_token_id)
        if "loss" in metrics:
            out["eval_loss"] = loss
        if "perplexity" in metrics:
            out["perplexity"] = math.exp(loss) if loss < 700 else math.inf
    generated = [m for m in metrics if m not in FROM_LOSS]
    if generated:
        if not prompts:
            raise UserError(f"--metrics {','.join(generated)}: the eval data has no prompts "
                            "with reference answers (plain text rows); use loss,perplexity")
        exact, rows = exact_match(accelerator, model, tokenizer, prompts, max_new_tokens)
        answers, references = [r[1] for r in rows], [r[2] for r in rows]
        for name in generated:
            if name == "exact_match":
                out[name] = exact
                continue
            result = evaluate.load(metric_path(name)).compute(predictions=answers,
                                                               references=references)
            out.update({k: v for k, v in result.items() if isinstance(v, (int, float))})
        samples = [{"prompt": p, "answer": a, "reference": r} for p, a, r in rows[:3]]
    return out, samples


def run_eval(path: str | Path, data: str = "", metrics: str = DEFAULT_METRICS,
             base: bool = False, limit: int = 0, max_new_tokens: int = 0) -> dict:
    """Evaluate, record in the run directory, and return the eval.json entry."""
    from accelerate import Accelerator

    from peftkit.run.runs import load_run

    wanted = parse_metrics(metrics)
    if limit < 0 or max_new_tokens < 0:
        raise UserError("--limit and --max-new-tokens must be >= 0")
    path = Path(path)
    recipe, model, tokenizer = load_run(path)
    examples, prompts, source = eval_data(recipe, tokenizer, data)
    if limit:
        examples, prompts = examples[:limit], prompts[:limit]
    accelerator = Accelerator()
    began = time.perf_counter()
    with model.disable_adapter() if base else nullcontext():
        values, samples = score(accelerator, model, tokenizer, examples, prompts, wanted,
                                recipe.train.batch_size,
                                max_new_tokens or recipe.train.max_new_tokens)
    entry = {"metrics": values, "data": source, "samples": len(examples),
             "prompts": len(prompts), "limit": limit or None,
             "seconds": round(time.perf_counter() - began, 2),
             "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "answers": samples}
    record(path, recipe, "base" if base else "adapter", entry)
    return entry


def record(path: Path, recipe, kind: str, entry: dict) -> None:
    """Write eval.json, a metrics.jsonl line and the refreshed model card."""
    import json

    from peftkit.run import card
    from peftkit.run import rundir

    file = RunDir(path).eval_file
    try:
        evals = json.loads(file.read_text()) if file.is_file() else {}
    except json.JSONDecodeError:
        evals = {}  # a damaged file from an interrupted write: rewritten whole below
    evals[kind] = entry
    rundir.write_json(file, evals)
    rundir.MetricsLog(path, enabled=True).write(
        event="eval_cli", model=kind, data=entry["data"], samples=entry["samples"],
        results=entry["metrics"])
    result_file = RunDir(path).result_file
    if result_file.is_file():  # the card needs training's numbers (absent if it was cut off)
        from types import SimpleNamespace

        fields = {"steps": 0, "trainable": 0, "total": 0, "train_loss": math.nan,
                  "tokens_per_s": 0.0, "evals": {}, "forgetting": None}
        saved = json.loads(result_file.read_text())
        result = SimpleNamespace(**{k: saved.get(k, v) for k, v in fields.items()})
        RunDir(path).card.write_text(
            card.model_card(recipe, result, rundir.read_metrics(path), evals=evals))
