"""`peftkit merge RUN --out DIR`: fold a run's adapter into its base, check that the merged
model behaves as the adapter did, and save a plain transformers model directory.

In this order, so that one full model is in memory at a time:
1. 4/8-bit base only: the adapter on the quantized base, as it was trained. Its logits on the
   probe batch are the reference; a digest of each quantized weight, dequantized, is kept;
   then it is freed.
2. The base again, unquantized, in the output dtype, with the adapter (peft): its logits.
   4/8-bit base: two merge targets are measured against the reference (1): the base's
   original-precision weights, and the same weights quantized and dequantized in place the
   way the trained model saw them (checked against the digests). The target whose logits are
   closer to the reference (mean |difference|) is merged into; the original weights are
   loaded again if they win. Both targets' figures go into merge_report.json ("target").
3. peft's `merge_and_unload`, in place; the merged model's logits are checked against 2 (the
   merge itself, exact to the dtype's rounding) and against 1 (what unquantizing the base
   changed). The model as trained (1, else the merged model) is checked against the loss
   training recorded on the same batch (result.json "probe"): the files on disk must still
   be the model that was trained (same base, intact adapter).
4. Save: safetensors shards, config, generation config, tokenizer and chat template,
   merge_report.json; when a check failed also MERGE_FAILED.txt, and exit 1.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch

from peftkit.adapters.registry import adapter_method
from peftkit.run import rundir
from peftkit.data.batching import collate
from peftkit.data.example import Example
from peftkit.run.rundir import RunDir, MergeDir
from peftkit.errors import RunError, UserError
from peftkit.model.loading import load_model, resolve_precision
from peftkit.run.runs import base_of, load_tokenizer, read_recipe
from peftkit.export.measure import choose_target, deviation, forward, quantized_weights
from peftkit.training.probe import (PROBE_EXAMPLES, PROBE_TOKENS, dtype_name as _name,
                                    fingerprint, probe_examples)

DTYPES = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Merged vs adapter on the same weights differ only by the rounding of W + scale * B @ A.
# Allowed max |logit difference|: 8 units of the dtype's rounding (eps) of the largest logit,
# and at least 1e-4 x sqrt(layers / 2). Measured on tiny Llamas (2 layers): fp32 1e-6..3e-6
# (so the floor binds); bf16 and fp16 0.5..0.8 eps x max|logit| (docs/merge-and-publishing.md,
# "Merge"). The floor grows with depth because each layer adds its own float32 rounding of the
# forward (a random walk, hence the square root): SmolLM2-135M (30 layers) measured 1.2e-4 in
# float32 while the same comparison in float64 gave 8.6e-6, i.e. the merged weights are right.
# A merge that is wrong moves logits by orders of magnitude more (an adapter scaled by 1.01
# already moves the probe loss past LOSS_RTOL).
EPS = {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}
EPS_FACTOR, FLOOR = 8, 1e-4
# Allowed relative change of the probe loss. Against the loss recorded at the end of
# training, by the least precise of training and merge: fp32 (measured < 1e-5) or 16-bit
# (bf16 merge measured 0.04-0.12%). Merged vs the adapter on the 4/8-bit base it was trained
# on: measured 0.03-3% (tiny random-weight models, whose quantization error is larger than a
# real model's). For scale: an adapter file with B scaled x10 changed it by 2.7-700%.
LOSS_RTOL = {"fp32": 1e-3, "16-bit": 0.02, "4/8-bit": 0.10}
CLASSES = list(LOSS_RTOL)


class MergeFailed(RunError):
    """The merged model failed a check; it was saved anyway, marked by MERGE_FAILED.txt."""


# --- the probe batch (peftkit/training/probe.py), from the run's held-out data ------------

def _probe_batch(recipe, tokenizer, vocab_size: int) -> tuple[dict, list[Example], str]:
    """(batch, its examples, where it came from): the run's held-out data, or seeded random
    token ids (loss on every token) when the run has none or it cannot be read."""
    from peftkit.inference.evaluate import eval_data

    try:
        probe = probe_examples(eval_data(recipe, tokenizer)[0])
        why = "no held-out example has a labelled token"
    except (UserError, OSError) as exc:
        probe, why = [], str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if probe:
        return (collate(probe, tokenizer.pad_token_id), probe,
                f"held-out data: {len(probe)} examples, up to {PROBE_TOKENS} tokens")
    ids = torch.randint(0, vocab_size, (PROBE_EXAMPLES, 64),
                        generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    return batch, [], f"seeded random token ids ({why})"


# --- the merge ---------------------------------------------------------------------------------

def merge_run(run: str | Path, out: str | Path, dtype: str = "auto", overwrite: bool = False,
              say=print) -> dict:
    """Merge, check, save; returns the report (merge_report.json). Raises MergeFailed (after
    saving the output, marked) when a check fails."""
    from transformers import AutoConfig  # slow import: lazy


    run, out = Path(run), Path(out)
    recipe, doc = read_recipe(run)
    if not RunDir(run).adapter_config.is_file():
        raise UserError(f"{run}: the run has no adapter/ (did training finish?)")
    refusal = adapter_method(recipe.adapter).merge_refusal
    if refusal:
        raise UserError(f"adapter.method={recipe.adapter.method}: {refusal}")
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: use one of {', '.join(DTYPES)}")
    _check_out(out, overwrite)
    began = time.perf_counter()
    base = base_of(recipe, doc)
    m = recipe.model
    tokenizer = load_tokenizer(run, recipe, base)
    config = AutoConfig.from_pretrained(base, revision=m.revision,
                                        trust_remote_code=m.trust_remote_code)
    out_dtype = DTYPES[dtype] or _stored_dtype(config)
    batch, probe, source = _probe_batch(recipe, tokenizer, config.vocab_size)
    say(f"probe batch: {source}")

    quantized_ref, quantized, quant_device = (
        _quantized_reference(run, recipe, base, batch, out_dtype, say) if m.quantize
        else (None, None, None))
    target, target_notes = None, []

    def unquantized():
        base_model = load_model(base, dataclasses.replace(m, quantize=None), out_dtype, say=say)
        where = _device_for(base_model)
        return _with_adapter(base_model.to(where), run), where

    model, device = unquantized()
    adapter_ref = forward(model, batch, device)
    if quantized_ref is not None:
        target, target_notes, chosen_ref = choose_target(
            model, adapter_ref, quantized_ref, batch, device, quantized, quant_device,
            m.quantize)
        say(f"merge target: {target['summary']}")
        if chosen_ref is None:  # the original weights won, but were changed in place: reload
            del model
            gc.collect()
            model, device = unquantized()
            chosen_ref = forward(model, batch, device)
        adapter_ref = chosen_ref
    merged = model.merge_and_unload(safe_merge=True)  # in place: no second copy of the weights
    del model
    got = forward(merged, batch, device)

    layers = getattr(merged.config, "num_hidden_layers", 2)
    checks, notes = _verify(run, probe, got, adapter_ref, quantized_ref, out_dtype, m.quantize,
                            layers)
    notes += target_notes
    ok = all(c["ok"] for c in checks)
    report = {"ok": ok, "run": str(run), "base": base, "dtype": _name(out_dtype),
              "dequantized_from": m.quantize, "target": target, "device": device.type,
              "batch": {"source": source, "sequences": int(batch["input_ids"].shape[0]),
                        "tokens": int(batch["attention_mask"].sum())},
              "checks": checks, "notes": notes,
              "seconds": round(time.perf_counter() - began, 2),
              "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
              "versions": rundir.versions()}
    for c in checks:
        say(f"  {'ok' if c['ok'] else 'FAILED'}  {c['name']}: {c['summary']}")
    for note in notes:
        say(f"  note: {note}")
    _save(merged, tokenizer, config, out, report)
    rundir.MetricsLog(run, enabled=True).write(
        event="merge", out=str(out), ok=ok, dtype=report["dtype"],
        dequantized_from=m.quantize, checks={c["name"]: _scalars(c) for c in checks})
    if not ok:
        failed = "; ".join(f"{c['name']}: {c['summary']}" for c in checks if not c["ok"])
        raise MergeFailed(f"merge verification failed ({failed}); the output in {out} is kept "
                          "but marked MERGE_FAILED.txt, see merge_report.json")
    return report


def _quantized_reference(run: Path, recipe, base: str, batch: dict, out_dtype, say):
    """(logits and loss of the adapter on the 4/8-bit base it was trained on, that base's
    quantized weights as `measure.quantized_weights` describes them, its device); the model
    is freed before returning: one model in memory at a time."""
    m = recipe.model
    say(f"the adapter was trained on a {m.quantize} base: merging into an unquantized "
        f"{_name(out_dtype)} copy of the base (never into {m.quantize} weights): its "
        f"original weights or its {m.quantize}-dequantized weights, whichever is closer "
        f"to the adapter on the {m.quantize} base")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = resolve_precision(m, recipe.launch, device.type)
    model = _with_adapter(load_model(base, m, precision.dtype, precision.compute_dtype,
                                     device, say=say), run)
    reference = forward(model, batch, device)
    quantized = quantized_weights(model)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return reference, quantized, device


def _verify(run: Path, probe: list[Example], got: tuple, adapter_ref: tuple,
            quantized_ref: tuple | None, dtype: torch.dtype, quantize: str | None,
            layers: int) -> tuple[list[dict], list[str]]:
    """(checks, notes) for merged logits/loss `got` (see the module docstring)."""
    checks, notes = [_exactness(adapter_ref, got, dtype, layers)], []
    if quantized_ref is not None:
        checks.append(_dequantization(quantized_ref, got, quantize))
    # The model as trained: on the quantized base when there was one, else the merged model
    # (equal to the adapter on the same weights, checked above).
    if quantized_ref is None:
        anchor = _as_trained(run, probe, got[1], dtype, notes)
    else:
        anchor = _as_trained(run, probe, quantized_ref[1], None, notes)
    return checks + ([anchor] if anchor else []), notes


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse, before loading anything, to write into a non-empty directory, unless it is a
    previous merge output and --overwrite says so."""
    if not (out.exists() and (not out.is_dir() or any(out.iterdir()))):
        return
    if not overwrite:
        raise UserError(f"--out {out}: not empty; choose another directory or pass "
                        "--overwrite to replace a previous merge")
    if not MergeDir(out).report_file.is_file():
        raise UserError(f"--overwrite: {out} is not the output of `peftkit merge` (no "
                        "merge_report.json); refusing to delete it")


def _stored_dtype(config) -> torch.dtype:
    """The dtype the base checkpoint is stored in (float32 when it does not say)."""
    found = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(found, str):
        found = getattr(torch, found, None)
    return found if found in EPS else torch.float32


def _device_for(model) -> torch.device:
    """The GPU when the unquantized model fits in its free memory with room to spare (merging
    there is faster), else the CPU, where the model was loaded."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    need = sum(p.numel() * p.element_size() for p in model.parameters())
    return torch.device("cuda" if 1.3 * need < torch.cuda.mem_get_info()[0] else "cpu")


def _with_adapter(base, run: Path):
    from peft import PeftModel

    return PeftModel.from_pretrained(base, RunDir(run).adapter).eval()


def _loss_check(name: str, reference: float, merged: float, cls: str, what: str) -> dict:
    tolerance = LOSS_RTOL[cls] * max(abs(reference), 0.1)
    change = merged - reference
    ok = abs(change) <= tolerance
    return {"name": name, "ok": ok, "precision": cls, "reference_loss": reference,
            "merged_loss": merged, "loss_tolerance": tolerance,
            "summary": f"probe loss {merged:.5f} vs {reference:.5f} {what} (change "
                       f"{change:+.2e}, allowed +-{tolerance:.1e}: {cls})"}


def _exactness(ref: tuple, got: tuple, dtype: torch.dtype, layers: int) -> dict:
    dev = deviation(ref, got)
    floor = FLOOR * math.sqrt(max(layers, 2) / 2)
    tolerance = max(floor, EPS_FACTOR * EPS[dtype] * dev["max_abs_logit"])
    ok = dev["max_abs_logit_diff"] <= tolerance  # False for NaN too
    return {"name": "merge exact", "ok": ok, **dev, "tolerance": tolerance,
            "summary": f"max |logit diff| {dev['max_abs_logit_diff']:.2e} vs the adapter on "
                       f"the same {_name(dtype)} weights (allowed {tolerance:.1e}), greedy "
                       f"agreement {100 * dev['greedy_agreement']:.1f}%"}


def _dequantization(ref: tuple, got: tuple, quantize: str) -> dict:
    """Merged (unquantized) vs the adapter on the quantized base: the logits differ by the
    base's quantization error, reported as measured; the check is on the probe loss."""
    dev = deviation(ref, got)
    check = _loss_check("dequantized base", ref[1], got[1], "4/8-bit",
                        f"with the adapter on the {quantize} base")
    check.update({k: v for k, v in dev.items() if k not in check})
    check["summary"] += (f"; logits: max |diff| {dev['max_abs_logit_diff']:.3f}, mean "
                         f"{dev['mean_abs_logit_diff']:.4f}, greedy agreement "
                         f"{100 * dev['greedy_agreement']:.1f}%")
    return check


def _as_trained(run: Path, probe: list[Example], loss: float, dtype: torch.dtype | None,
                notes: list[str]) -> dict | None:
    """The probe loss of the model as trained (`dtype`: of the merged model, when that is the
    one measured) against the loss training recorded (result.json)."""
    try:
        recorded = json.loads(RunDir(run).result_file.read_text()).get("probe") or {}
    except (OSError, json.JSONDecodeError):
        recorded = {}
    if "loss" not in recorded:
        notes.append("result.json records no probe loss (no held-out data, or an older "
                     "peftkit): not checked against the model as trained")
        return None
    if not probe or fingerprint(probe) != recorded.get("fingerprint"):
        notes.append("the held-out data differs from training's (changed or unreadable): "
                     "not checked against the model as trained")
        return None
    trained = _precision_class(recorded.get("dtype", "float32"),
                               recorded.get("compute_dtype") or "float32",
                               recorded.get("mixed_precision", "no"))
    cls = trained if dtype is None else max(trained, _precision_class(_name(dtype)),
                                            key=CLASSES.index)
    what = "recorded at the end of training" + (", adapter on the quantized base"
                                                 if dtype is None else "")
    return _loss_check("as trained", recorded["loss"], loss, cls, what)


def _precision_class(dtype: str, compute: str = "float32", mixed: str = "no") -> str:
    return "fp32" if dtype == compute == "float32" and mixed in ("no", "None") else "16-bit"


def _scalars(check: dict) -> dict:
    return {k: v for k, v in check.items() if isinstance(v, (int, float, bool))}


def _save(merged, tokenizer, config, out: Path, report: dict) -> None:
    """Write the model directory under a temporary name, then rename it into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    try:
        # Training switched the KV cache off; inference wants the base's setting back.
        merged.config.use_cache = getattr(config, "use_cache", True)
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        rundir.write_json(MergeDir(tmp).report_file, report)
        if not report["ok"]:
            MergeDir(tmp).failed_marker.write_text(
                "This merged model FAILED peftkit's verification; do not use it.\n"
                + "".join(f"{c['name']}: {c['summary']}\n" for c in report["checks"]
                          if not c["ok"]) + "Details: merge_report.json\n")
        if out.exists():  # checked by _check_out: a previous merge output, with --overwrite
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
