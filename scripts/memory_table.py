"""Measure peak training memory against peftkit's estimate (docs/qlora-and-memory.md, "Memory
estimate vs measured").

Each configuration trains a few steps in its own process (`python -m peftkit train`), so no
earlier run's memory hides in its peak; the run's result.json records the estimate and the
measurement (peftkit/model/memory.py). The data are long rows of Python standard-library source,
cut at data.max_len, so every micro-batch is full length, as the estimate assumes.

    python scripts/memory_table.py              # all configurations, prints a markdown table
    python scripts/memory_table.py --only s-nf4 # one of them
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

# glibc raises its mmap threshold as large blocks are freed, and then keeps freed activations
# in its heaps: RSS overstates live memory. A fixed threshold returns them at once.
FIXED_MMAP = {"MALLOC_MMAP_THRESHOLD_": "131072"}
RECIPE = "llama3-8b-qlora"  # run in its tiny form (or on a local model directory)
COMMON = ["model.tiny=true", "train.max_steps=3", "train.grad_accum=1", "train.warmup_steps=0", "train.eval_every=0",
          "train.save_every=0", "data.eval_size=8", "data.format=text", "train.log_every=1"]
FP32 = ["model.quantize=none", "model.compute_dtype=auto"]
INT8 = ["model.quantize=int8", "model.compute_dtype=auto"]
XS = ["model.tiny_size=xs", "data.max_len=256", "train.batch_size=8"]
S = ["model.tiny_size=s", "data.max_len=256", "train.batch_size=8"]
GC_OFF = ["train.gradient_checkpointing=false"]
# (name, what, overrides); "m" is a user's local model directory (hidden 512, 8 layers, vocab 32k)
CONFIGS = [
    ("xs-fp32", "tiny xs, fp32", XS + FP32 + GC_OFF),
    ("xs-nf4", "tiny xs, nf4", XS + GC_OFF),
    ("s-fp32", "tiny s, fp32", S + FP32 + GC_OFF),
    ("s-fp32-gc", "tiny s, fp32, checkpointing", S + FP32),
    ("s-nf4", "tiny s, nf4", S + GC_OFF),
    ("s-nf4-gc", "tiny s, nf4, checkpointing", S),
    ("s-int8-gc", "tiny s, int8, checkpointing", S + INT8),
    ("m-fp32", "local 512x8, vocab 32k, fp32", ["data.max_len=512", "train.batch_size=4"]
     + FP32 + GC_OFF),
    ("m-nf4-gc", "local 512x8, vocab 32k, nf4, checkpointing",
     ["data.max_len=512", "train.batch_size=4"]),
]


def write_text_rows(path: Path, rows: int = 64, chars: int = 6000) -> None:
    """Long text rows from the standard library's sources (offline, deterministic)."""
    src = Path(sysconfig.get_paths()["stdlib"])
    text = "".join(p.read_text(errors="ignore") for p in sorted(src.glob("*.py"))[:40])
    with path.open("w") as f:
        for i in range(rows):
            f.write(json.dumps({"text": text[i * chars:(i + 1) * chars]}) + "\n")


def build_local_model(target: Path) -> None:
    """A random-weight Llama of a larger shape than the tiny forms, as a user's local model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from peftkit.model.tiny import tokenizer_dir

    tok = AutoTokenizer.from_pretrained(tokenizer_dir())
    config = AutoConfig.for_model(
        "llama", vocab_size=32000, hidden_size=512, intermediate_size=1408,
        num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
        max_position_embeddings=4096, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(target)
    tok.save_pretrained(target)


def run(name: str, overrides: list[str], work: Path, data: Path, env: dict) -> dict:
    out = work / "runs"
    args = [sys.executable, "-m", "peftkit", "train", RECIPE, *COMMON, *overrides,
            f"data.train={data}", f"train.output_dir={out}", f"name={name}", "--overwrite"]
    if name.startswith("m-"):
        args += [f"model.name={work / 'local-model'}", "model.tiny=false"]
    began = time.time()
    done = subprocess.run(args, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **env})
    if done.returncode:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    result = json.loads((out / name / "result.json").read_text())
    result["seconds"] = time.time() - began
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="names of configurations to run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="peftkit-memory-") as tmp:
        work = Path(tmp)
        data = work / "text.jsonl"
        write_text_rows(data)
        rows = ["| run | estimate | measured | measured / estimate | measured, fixed mmap "
                "threshold | ratio |", "|---|---|---|---|---|---|"]
        for name, what, overrides in CONFIGS:
            if args.only and name not in args.only:
                continue
            if name.startswith("m-") and not (work / "local-model").exists():
                build_local_model(work / "local-model")
            cells = []
            for env in ({}, FIXED_MMAP):
                mem = run(name, overrides, work, data, env)["memory"]
                got = mem["measured"]["above_baseline_bytes"] / 2 ** 20
                cells.append(f"{got:,.0f} MB | {mem['measured_over_estimate']:.2f}")
            est = mem["estimate"]["total_bytes"] / 2 ** 20
            rows.append(f"| {what} | {est:,.0f} MB | {' | '.join(cells)} |")
            print(rows[-1], json.dumps(mem["estimate"]["parts_bytes"]), file=sys.stderr,
                  flush=True)
        print("\n".join(rows))


if __name__ == "__main__":
    main()
