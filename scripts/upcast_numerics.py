"""What keeping a QLoRA base's unquantized weights in bf16 changes in the loss (CPU).

`model.upcast_unquantized=false` (peftkit's default) keeps embeddings, norms and LM head in
the base dtype instead of peft's float32 upcast. This trains the same LoRA on the same NF4
base three ways, same seed and batches, and compares the losses step by step:

- kept:      bf16 embeddings/norms/head, bf16 autocast, bf16 4-bit compute (the default)
- upcast:    float32 embeddings/norms/head (peft's preparation), otherwise as kept
- reference: float32 embeddings/norms/head, no autocast, float32 4-bit compute

Every variant loads the base in bf16 (as a real checkpoint is stored) and quantizes it the
same way, so they differ only in the precision of the arithmetic. The base is peftkit's
tiny "s" Llama (random weights, hidden 256, 4 layers) and the data the demo's sort/reverse
task. CPU bf16 autocast rounds as a GPU's does (bf16 storage, float32 accumulation), but
the kernels differ: a GPU run is still to confirm it (docs/qlora-and-memory.md).

    python scripts/upcast_numerics.py [--steps 80] [--out benchmarks/results/numerics/upcast-cpu.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from peftkit.data import dataset, packing  # noqa: E402
from peftkit.data.batching import BatchStream  # noqa: E402
from peftkit.model import fused_lora  # noqa: E402
from peftkit.model.loading import (attach_adapter, base_path, load_model,  # noqa: E402
                                   load_tokenizer, prepare_for_training)
from peftkit.recipe import registry  # noqa: E402
from peftkit.recipe.overrides import apply_overrides  # noqa: E402
from peftkit.training.loss import TokenLoss  # noqa: E402

VARIANTS = {  # name: (upcast unquantized weights, bf16 autocast + compute)
    "kept": (False, True),
    "upcast": (True, True),
    "reference": (True, False),
}


def recipe_for(upcast: bool):
    return apply_overrides(registry.resolve("demo").recipe, [
        "model.quantize=nf4", "adapter.modules_to_save=", "adapter.dropout=0.0",
        "adapter.r=16", "train.batch_size=16", "train.lr=1e-3",
        f"model.upcast_unquantized={upcast}"])


def train_variant(upcast: bool, bf16: bool, steps: int, eval_every: int) -> dict:
    recipe = recipe_for(upcast)
    m = replace(recipe.model, dtype="bfloat16",
                compute_dtype="bfloat16" if bf16 else "float32")
    path = base_path(m)
    tokenizer, _ = load_tokenizer(path, m)
    train_ex, eval_ex, _, _ = dataset.build(recipe.data, tokenizer, recipe.train.seed)
    torch.manual_seed(recipe.train.seed)
    base = load_model(path, m, torch.bfloat16, getattr(torch, m.compute_dtype), "cpu")
    packing.enable(base, True)
    model = attach_adapter(prepare_for_training(base, m, False), recipe.adapter)
    fused_lora.enable(model)
    loss_module = TokenLoss(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=recipe.train.lr)
    stream = BatchStream(train_ex, recipe.train.batch_size, recipe.train.seed)

    def mean_loss(batch) -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            total, count = loss_module(**packing.collate_packed(batch))
        return total, count.item()

    losses, evals, began = [], {}, time.perf_counter()
    for step in range(1, steps + 1):
        model.train()
        total, count = mean_loss(stream.next())
        (total / count).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total.item() / count)
        if step % eval_every == 0 or step == steps:
            model.eval()
            with torch.no_grad():
                sums = [mean_loss(eval_ex[i:i + 32]) for i in range(0, len(eval_ex), 32)]
            evals[step] = sum(s.item() for s, _ in sums) / sum(c for _, c in sums)
    return {"train_loss": losses, "eval_loss": evals,
            "seconds": time.perf_counter() - began}


def compare(runs: dict) -> dict:
    """Mean and largest step-wise |loss difference| of each variant to the reference, the
    relative difference of the final eval loss, and of the last 20 steps' mean."""
    ref = runs["reference"]
    out = {}
    for name in ("kept", "upcast"):
        diffs = [abs(a - b) for a, b in zip(runs[name]["train_loss"], ref["train_loss"])]
        last = max(ref["eval_loss"])
        tail = slice(-20, None)
        out[name] = {
            "mean_abs_train_loss_diff": statistics.fmean(diffs),
            "max_abs_train_loss_diff": max(diffs),
            "final_eval_loss": runs[name]["eval_loss"][last],
            "final_eval_rel_diff": runs[name]["eval_loss"][last] / ref["eval_loss"][last] - 1,
            "last20_train_rel_diff": statistics.fmean(runs[name]["train_loss"][tail])
            / statistics.fmean(ref["train_loss"][tail]) - 1,
        }
    out["reference"] = {"final_eval_loss": ref["eval_loss"][max(ref["eval_loss"])],
                        "first_train_loss": ref["train_loss"][0],
                        "last20_train_loss": statistics.fmean(ref["train_loss"][-20:])}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--eval-every", type=int, default=40)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "numerics" /
                                               "upcast-cpu.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())
    runs = {}
    for name, (upcast, bf16) in VARIANTS.items():
        runs[name] = train_variant(upcast, bf16, args.steps, args.eval_every)
        print(f"{name}: eval {runs[name]['eval_loss']} ({runs[name]['seconds']:.0f} s)",
              flush=True)
    summary = compare(runs)
    import bitsandbytes
    import peft
    import transformers
    result = {"what": __doc__.splitlines()[0], "steps": args.steps, "summary": summary,
              "runs": runs, "versions": {"torch": torch.__version__,
                                         "transformers": transformers.__version__,
                                         "peft": peft.__version__,
                                         "bitsandbytes": bitsandbytes.__version__},
              "machine": platform.processor() or platform.machine()}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print("| variant | mean abs train-loss diff to reference | max | final eval loss | "
          "vs reference |")
    print("|---|---|---|---|---|")
    for name in ("kept", "upcast"):
        s = summary[name]
        print(f"| {name} | {s['mean_abs_train_loss_diff']:.4f} | "
              f"{s['max_abs_train_loss_diff']:.4f} | {s['final_eval_loss']:.4f} | "
              f"{100 * s['final_eval_rel_diff']:+.2f}% |")
    print(f"| reference | | | {summary['reference']['final_eval_loss']:.4f} | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
