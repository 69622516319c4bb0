"""`peftkit bench`: train a recipe for a fixed number of samples and measure it, side by side
with the plain transformers Trainer + peft baseline (bench_hf.py) on the same work.

    samples = steps x batch_size x grad_accum rows of data.train (select_samples), once each

Every side runs in its own fresh Python process (bench_run.py), so each peak memory is its own;
`inline=True` runs them one after another in this process instead (fast, for tests: then a
later side's RSS baseline includes what earlier sides left behind). Throughput is measured over
steps 2..N (step 1 pays one-off allocations and lazy initialisation) as useful tokens/s (real,
non-padding input tokens) and samples/s; MFU is model FLOPs (flops.py) over the same steps
divided by this machine's matmul peak measured in the same invocation.

A comparison is only reported if both sides did the same work (`equal_work`): the same
samples, each once, and the same token count; on an identical batch, the same loss with the
adapter off and on and the same adapter gradients. Otherwise it is refused (exit 1) with the
reason, so a refusal always means different computation. The sides train the samples in
different orders, which moves the mean and final training loss (more so at a high learning
rate): their differences are reported, never refused.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from peftkit.bench.same_work import EqualWork, equal_work
from peftkit.recipe.schema import Recipe
from peftkit.recipe.validate import validate
from peftkit.errors import RunError, UserError

BASELINES = ("hf", "hf-grouped", "trl")


def bench_recipe(recipe: Recipe, steps: int, output_dir: str) -> Recipe:
    """`recipe` trained for exactly `steps` optimizer steps, with nothing else in the timed
    loop (no eval, a checkpoint only at the end)."""
    t = recipe.train
    train = dataclasses.replace(t, max_steps=steps, warmup_steps=min(t.warmup_steps, steps),
                                log_every=1, eval_every=0, save_every=0, eval_generate=0,
                                output_dir=output_dir, **_if_field(t, report_to="none"))
    data = dataclasses.replace(recipe.data, eval="", eval_size=0)
    launch = dataclasses.replace(recipe.launch, num_processes=1)
    name = f"bench-{recipe.name or 'run'}"
    return validate(dataclasses.replace(recipe, train=train, data=data, launch=launch, name=name))


def _if_field(obj, **values) -> dict:
    names = {f.name for f in dataclasses.fields(obj)}
    return {k: v for k, v in values.items() if k in names}


# ---------------------------------------------------------------------------------------------
# The work every side must do, chosen and counted before any runs.

def select_samples(recipe: Recipe, folder: str) -> tuple[Recipe, dict]:
    """Choose the samples and write them to `folder`/samples.jsonl; point data.train there.

    The samples are `steps` batches drawn at random (seeded) from one epoch over all of
    data.train as the Trainer's length grouping orders it (transformers'
    `get_length_grouped_indices`, the function behind `train_sampling_strategy=
    "group_by_length"`, with its megabatches of up to 50 batches). The file keeps that order,
    so the hf-grouped side, reading it sequentially, trains exactly the batches length grouping
    forms in a full epoch; the other sides shuffle as they always do. (Grouping a small
    benchmark subset itself would not group at all: the Trainer sizes megabatches from the
    dataset, and below 4 x 2 batches each megabatch is a single batch.)
    """
    import random

    from transformers.trainer_pt_utils import get_length_grouped_indices

    from peftkit.data.batching import loss_tokens
    from peftkit.bench.same_work import fingerprint, sequences
    from peftkit.model.loading import base_path, load_tokenizer

    d, t = recipe.data, recipe.train
    tokenizer, _ = load_tokenizer(base_path(recipe.model), recipe.model)
    fmt, candidates = _candidates(recipe, tokenizer)
    group = t.batch_size * t.grad_accum
    order = get_length_grouped_indices([len(e.input_ids) for _, e in candidates], group,
                                       generator=torch.Generator().manual_seed(t.seed))
    groups = [order[i:i + group] for i in range(0, len(order) - group + 1, group)]
    if len(groups) < t.max_steps:
        raise UserError(f"data.train: {len(candidates)} usable rows make {len(groups)} batches "
                        f"of {group}, fewer than the {t.max_steps} steps asked for; lower "
                        "--steps or add data")
    picked = sorted(random.Random(t.seed).sample(range(len(groups)), t.max_steps))
    chosen = [candidates[i] for g in picked for i in groups[g]]
    path = Path(folder) / "samples.jsonl"
    path.write_text("".join(json.dumps(dict(row), ensure_ascii=False) + "\n"
                            for row, _ in chosen))
    examples = [e for _, e in chosen]
    lengths = [len(e.input_ids) for e in examples]
    # A preference pair is two sequences (prompt + chosen, prompt + rejected): its tokens are
    # both sequences', and attention runs within each (flops_per_token).
    lengths_run = [len(s.input_ids) for e in examples for s in sequences(e)]
    work = {"samples": len(examples), "tokens": sum(lengths), "labelled": loss_tokens(examples),
            "lengths": lengths_run,
            "fingerprints": sorted(fingerprint(e.input_ids) for e in examples),
            "selection": {"rows": len(candidates), "batches_in_epoch": len(groups),
                          "megabatch_batches": max(1, min(len(candidates) // (group * 4), 50)),
                          "batches_picked": picked, "source": d.train}}
    selected = dataclasses.replace(d, train=str(path), format=fmt, max_samples=0)
    return dataclasses.replace(recipe, data=selected), work


def _candidates(recipe: Recipe, tokenizer) -> tuple[str, list]:
    """(data.format to keep, [(row, its tokenized sample)]) of data.train: an `Example` per
    SFT row, a `PreferencePair` per preference row (train.objective dpo/orpo)."""
    from peftkit.data import preference
    from peftkit.data.formats import detect_format
    from peftkit.data.render import tokenize_record
    from peftkit.data.sources import BadRow, load_records
    from peftkit.recipe.objective import PREFERENCE_OBJECTIVES

    d = recipe.data
    rows, _ = load_records(d.train, d.skip_bad_rows)
    rows = rows[: d.max_samples or None]
    if recipe.train.objective in PREFERENCE_OBJECTIVES:
        # Row by row, so each pair keeps its row; pairs the objective drops (identical
        # responses, no response token left) are not candidates.
        pairs = [(row, preference.encode_pairs([row], tokenizer, d)[0]) for row in rows]
        return d.format, [(row, p[0]) for row, p in pairs if p]
    fmt = d.format if d.format != "auto" else detect_format(rows[0], rows[0].where)
    candidates = []
    for row in rows:
        try:
            example = tokenize_record(row, fmt, tokenizer, d, row.where)
        except BadRow:
            if not d.skip_bad_rows:
                raise
            continue
        if example is not None:
            candidates.append((row, example))
    return fmt, candidates


def flops_per_token(recipe: Recipe, work: dict) -> tuple[float, dict]:
    from transformers import AutoModelForCausalLM

    from peftkit.bench.flops import shape_of, train_flops
    from peftkit.model.loading import attach_adapter
    from peftkit.model.summary import base_config

    config, _ = base_config(recipe)
    with torch.device("meta"):
        shape = shape_of(attach_adapter(AutoModelForCausalLM.from_config(config),
                                        recipe.adapter))
    return train_flops(shape, work["lengths"], work["labelled"]) / work["tokens"], shape.to_dict()


# ---------------------------------------------------------------------------------------------
# Running the sides.

def _run_subprocess(side: str, recipe: Recipe, source: str, threads: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="peftkit-bench-") as tmp:
        spec, out = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec.write_text(json.dumps({"side": side, "recipe": recipe.to_dict(), "source": source,
                                    "threads": threads}))
        code = subprocess.call([sys.executable, "-m", "peftkit.bench.side", str(spec), str(out)])
        if code != 0 or not out.is_file():
            raise RunError(f"the {side} side failed (exit code {code}; its output is above)")
        return json.loads(out.read_text())


def run_sides(recipe: Recipe, source: str, sides: list[str], inline: bool,
              threads: int) -> dict[str, dict]:
    from peftkit.bench.side import run_side

    results = {}
    for side in sides:
        print(f"bench: running {side} ({'in this process' if inline else 'fresh process'})",
              file=sys.stderr, flush=True)
        results[side] = (json.loads(json.dumps(run_side(side, recipe, source))) if inline
                         else _run_subprocess(side, recipe, source, threads))
    return results


# ---------------------------------------------------------------------------------------------
# Checking and summarising.

def summarise(side: dict, recipe: Recipe, per_token: float, peak_flops: float) -> dict:
    timed = slice(1, None) if len(side["step_seconds"]) > 1 else slice(None)
    seconds = sum(side["step_seconds"][timed])
    tokens = sum(side["step_tokens"][timed])
    per_step = recipe.train.batch_size * recipe.train.grad_accum
    # trl packs samples into rows, so its steps hold varying sample counts: it reports them
    samples = (sum(side["step_samples"][timed]) if "step_samples" in side
               else len(side["step_seconds"][timed]) * per_step)
    tps = tokens / seconds
    mem = side["memory"]
    return {
        "tokens_per_s": tps,
        "samples_per_s": samples / seconds,
        "step_seconds_mean": statistics.fmean(side["step_seconds"][timed]),
        "step_seconds_median": statistics.median(side["step_seconds"][timed]),
        "first_step_seconds": side["step_seconds"][0],  # untimed: allocations, compilation
        "peak_memory_bytes": mem.get("above_baseline_bytes"),
        "peak_memory_absolute_bytes": mem.get("peak_bytes"),
        "memory_method": mem.get("method"),
        "page_faults": mem.get("page_faults"),
        "padding_share": 1 - sum(side["step_tokens"]) / side["computed_tokens"]
        if side.get("computed_tokens") else None,
        "mfu": per_token * tps / peak_flops,
        "model_flops_per_s": per_token * tps,
        "trainable": side["parameters"][0], "total": side["parameters"][1],
        "final_loss": side["step_loss"][-1], "mean_loss": statistics.fmean(side["step_loss"]),
        "reference_loss": side["reference_loss"], "adapter_loss": side.get("adapter_loss"),
        # DPO: the reference pass over the run's pairs, before step 1 on both sides (untimed
        # in the steps; measured on its own, see the sides)
        "reference_seconds": side.get("reference_seconds"),
        "reference_share": side["reference_seconds"] / (side["reference_seconds"]
                                                        + sum(side["step_seconds"]))
        if side.get("reference_seconds") else None,
        "packed": side["packed"], "side_settings": side.get("settings"),
        "threads": side["threads"], "loadavg_before": side["loadavg_before"],
        "loadavg_after": side["loadavg_after"],
    }


def environment() -> dict:
    from importlib import metadata

    versions = {}
    for package in ("peftkit", "torch", "transformers", "peft", "accelerate", "bitsandbytes",
                    "trl", "datasets"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    repo = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], text=True,
                                capture_output=True, timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "-C", str(repo), "status", "--porcelain"],
                                    text=True, capture_output=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        device = next((line.split(":", 1)[1].strip() for line in
                       Path("/proc/cpuinfo").read_text().splitlines()
                       if line.startswith("model name")), platform.processor()) \
            if Path("/proc/cpuinfo").is_file() else platform.processor()
        device = f"{device}, {os.cpu_count()} cores"
    return {"git_commit": commit, "git_dirty": dirty, "versions": versions, "device": device,
            "threads": torch.get_num_threads(), "python": platform.python_version()}


# ---------------------------------------------------------------------------------------------
# The command.

def bench(recipe: Recipe, source: str = "", vs: list[str] | None = None, steps: int = 8,
          out: str | None = None, inline: bool = False, threads: int = 0,
          repeat: int = 1) -> dict:
    """Run the benchmark; returns the result dict (also written to `out` as JSON).

    `repeat` > 1 runs every side `repeat` times, alternating (peftkit, the baselines, peftkit,
    ...), so that a change in the machine's load falls on all sides alike; each ratio is then
    the median of the per-run ratios, with its min and max (`ratios[side]["spread"]`), and
    `sides` shows each side's median run by tokens/s."""
    from peftkit.bench.flops import matmul_peak
    from peftkit.model.loading import base_path, resolve_precision

    vs = vs or []
    _check_arguments(vs, steps, repeat)
    if threads:
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="peftkit-bench-runs-") as runs:
        _check_objective(recipe, vs)
        recipe = bench_recipe(recipe, steps, runs)
        base_path(recipe.model)  # build a tiny base once, before the sides race to
        recipe, work = select_samples(recipe, runs)
        per_token, shape = flops_per_token(recipe, work)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        precision = resolve_precision(recipe.model, recipe.launch, device.type)
        dtype = torch.bfloat16 if precision.mixed_precision == "bf16" else precision.dtype
        peaks = [matmul_peak(device, dtype)]
        rounds = [run_sides(recipe, source, ["peftkit", *vs], inline, torch.get_num_threads())
                  for _ in range(repeat)]
        peaks.append(matmul_peak(device, dtype))
    peak = max(p["best_flops"] for p in peaks)
    summaries = [{name: summarise(s, recipe, per_token, peak) for name, s in sides.items()}
                 for sides in rounds]
    shown = _median_runs(summaries)
    result = {
        "recipe": recipe.name.removeprefix("bench-"), "source": source, "steps": steps,
        "samples": work["samples"], "tokens": work["tokens"], "labelled": work["labelled"],
        "selection": work["selection"],
        "settings": recipe.to_dict(), "environment": environment(),
        "isolation": "in-process" if inline else "one fresh process per side",
        "matmul_peak": {"flops": peak, "measurements": peaks},
        "flops_per_token": per_token, "shape": shape, "repeat": repeat,
        "sides": {name: summaries[i][name] for name, i in shown.items()},
        "raw": {name: {k: rounds[i][name][k] for k in ("step_seconds", "step_tokens",
                                                         "step_loss")}
                for name, i in shown.items()},
        "runs": {name: [{k: s[name][k] for k in ("tokens_per_s", "peak_memory_bytes",
                                                  "loadavg_before", "reference_seconds")}
                        for s in summaries]
                 for name in shown},
    }
    mixed = precision.mixed_precision != "no"
    verdict = _verdict(work, rounds, steps, mixed) if vs else EqualWork([], {}, mixed)
    result["equal_work"] = verdict.to_dict()
    result["ratios"] = {v: _ratio(summaries, v) for v in vs} if verdict.ok else {}
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=1) + "\n")
    return result


def _check_arguments(vs: list[str], steps: int, repeat: int) -> None:
    unknown = [v for v in vs if v not in BASELINES]
    if unknown:
        raise UserError(f"--vs {','.join(unknown)}: use {', '.join(BASELINES)}")
    if steps < 1 or repeat < 1:
        raise UserError(f"--steps {steps}: must be >= 1" if steps < 1
                        else f"--repeat {repeat}: must be >= 1")
    if "trl" in vs and importlib.util.find_spec("trl") is None:
        raise UserError("--vs trl: TRL is not installed; pip install 'peftkit[bench]' "
                        "(trl==1.16.0)")


def _check_objective(recipe: Recipe, vs: list[str]) -> None:
    """A preference recipe compares with TRL's DPOTrainer only, on what both compute."""
    from peftkit.recipe.objective import PREFERENCE_OBJECTIVES

    t, objective = recipe.train, recipe.train.objective
    if objective not in PREFERENCE_OBJECTIVES or not vs:
        return
    trainer = [v for v in vs if v != "trl"]
    if trainer:
        raise UserError(f"--vs {','.join(trainer)}: the Trainer baselines train SFT only; "
                        f"compare train.objective={objective} with --vs trl")
    if objective == "orpo":
        raise UserError("--vs trl: train.objective=orpo is not compared yet (TRL 1.16 ships "
                        "ORPOTrainer under trl.experimental); use train.objective=dpo")
    if t.label_smoothing:
        raise UserError(f"--vs trl: train.label_smoothing={t.label_smoothing:g} is conservative "
                        "DPO, which TRL 1.16's sigmoid loss does not do; set it to 0")
    if recipe.model.adapter_init:
        raise UserError("--vs trl: model.adapter_init (the starting adapter as reference) is "
                        "not compared; leave it empty (reference: the base)")


def _median_runs(summaries: list[dict[str, dict]]) -> dict[str, int]:
    """Per side, the run with the median tokens/s (the lower median for an even count)."""
    return {name: sorted(range(len(summaries)), key=lambda i: summaries[i][name]
                         ["tokens_per_s"])[(len(summaries) - 1) // 2]
            for name in summaries[0]}


def _verdict(work: dict, rounds: list[dict[str, dict]], steps: int, mixed: bool) -> EqualWork:
    """`equal_work` on every run; a problem in run k (of several) names the run."""
    verdicts = [equal_work(work, sides, steps, mixed) for sides in rounds]
    problems = [p if len(rounds) == 1 else f"run {k + 1}: {p}"
                for k, v in enumerate(verdicts) for p in v.problems]
    return EqualWork(problems, verdicts[0].info, mixed)


def _ratio(summaries: list[dict[str, dict]], other: str) -> dict:
    """peftkit over `other`, run by run (runs k of both sides ran next to each other): the
    median, and its spread."""
    def spread(values: list) -> dict | None:
        if any(v is None for v in values):
            return None
        return {"min": min(values), "median": statistics.median(values), "max": max(values),
                "runs": values}

    speed = spread([s["peftkit"]["tokens_per_s"] / s[other]["tokens_per_s"] for s in summaries])
    memory = spread([s["peftkit"]["peak_memory_bytes"] / s[other]["peak_memory_bytes"]
                     if s["peftkit"]["peak_memory_bytes"] and s[other]["peak_memory_bytes"]
                     else None for s in summaries])
    return {"tokens_per_s": speed["median"], "peak_memory": memory and memory["median"],
            "spread": {"tokens_per_s": speed, "peak_memory": memory}}
