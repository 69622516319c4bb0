"""What each of peftkit's choices buys: the peftkit side of one benchmark, run with its
optimisations switched on one at a time (each variant in its own fresh process).

    python benchmarks/ablation.py                  # small / varlen / LoRA
    python benchmarks/ablation.py --entry "tiny / varlen / LoRA"

Variants switch peftkit's own settings (data.packing) and module constants (loss.py's
HEAD_ONLY_ARCHS, head_loss.py's CHUNK_LOGITS, packing.py's kernel choice) in the child
process; nothing of transformers or peft is touched. Results: benchmarks/results/ablation-*.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import suite  # noqa: E402

# name -> (data.packing, LM head only on labelled positions, chunked head, kernel, overrides)
EAGER = ("train.compile=false",)
VARIANTS = {
    "padded batches, full logits (Trainer-like)": (False, False, False, None, EAGER),
    "+ LM head only on labelled positions": (False, True, False, None, EAGER),
    "+ packing, transformers' block mask": (True, True, False, "block-mask", EAGER),
    "+ packing, attention per sample": (True, True, False, "segments", EAGER),
    "+ chunked LM head and loss": (True, True, True, "segments", EAGER),
    "+ train.compile (= the benchmark recipe)": (True, True, True, "segments",
                                                 ("train.compile=true",)),
    "+ gradient checkpointing": (True, True, True, "segments",
                                 ("train.compile=true", "train.gradient_checkpointing=true")),
}


def apply_variant(name: str) -> list[str]:
    """Patch peftkit's own switches for `name` (in this child process); returns overrides."""
    from peftkit import head_loss, loss, packing

    packed, head_only, chunked, kernel, overrides = VARIANTS[name]
    if not head_only:
        loss.HEAD_ONLY_ARCHS = ()
    if not chunked:
        head_loss.CHUNK_LOGITS = 2 ** 62
    if kernel == "block-mask":
        # Packed rows without peftkit's kernel: no attention mask and restarted position_ids,
        # from which transformers builds a block-diagonal mask over the whole row (SDPA).
        real = packing.collate_packed
        packing.enable = lambda model, wanted: (wanted, None)
        packing.collate_packed = lambda batch, pad_id=None: {
            k: v for k, v in real(batch, pad_id).items()
            if k in ("input_ids", "labels", "position_ids")} | {"attention_mask": None}
    return [f"data.packing={str(packed).lower()}", *overrides]


def child(name: str, spec_path: str, out_path: str) -> int:
    from peftkit.bench_run import run_side
    from peftkit.config import apply_overrides, recipe_from_dict

    spec = json.loads(Path(spec_path).read_text())
    recipe = apply_overrides(recipe_from_dict(spec["recipe"]), apply_variant(name))
    Path(out_path).write_text(json.dumps(run_side("peftkit", recipe, spec["source"])))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entry", default="small / varlen / LoRA")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)

    import os

    import torch

    from peftkit import bench, registry
    from peftkit.config import apply_overrides
    from peftkit.flops import matmul_peak
    from peftkit.modeling import base_path

    entry = next(e for e in suite.entries() if e.label == args.entry)
    found = registry.resolve(entry.path)
    rows = []
    with tempfile.TemporaryDirectory(prefix="peftkit-ablation-") as tmp:
        recipe = bench.bench_recipe(apply_overrides(found.recipe, list(entry.overrides)),
                                    entry.steps, tmp)
        base_path(recipe.model)
        recipe, work = bench.select_samples(recipe, tmp)
        per_token, _ = bench.flops_per_token(recipe, work)
        peak = matmul_peak(torch.device("cpu"))["best_flops"]
        spec = Path(tmp) / "spec.json"
        spec.write_text(json.dumps({"recipe": recipe.to_dict(), "source": entry.path}))
        for name in VARIANTS:
            print(f"== {name} (load {os.getloadavg()[0]:.2f})", file=sys.stderr, flush=True)
            out = Path(tmp) / "out.json"
            subprocess.run([sys.executable, __file__, "--child", name, str(spec), str(out)],
                           check=True)
            side = json.loads(out.read_text())
            problems = bench.equal_work(work, {"peftkit": side}, entry.steps, mixed=False)
            rows.append({"variant": name, **bench.summarise(side, recipe, per_token, peak),
                         "problems": problems})
    result = {"entry": entry.label, "matmul_peak_flops": peak, "rows": rows,
              "environment": bench.environment()}
    path = HERE / "results" / f"ablation-{entry.slug}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(markdown(result))
    return 0


def markdown(result: dict) -> str:
    gb = 1024 ** 3
    lines = [f"Ablation, {result['entry']} (peftkit's loop; each row adds one change):", "",
             "| variant | useful tok/s | peak memory GB | MFU | mean loss | load |",
             "|---|--:|--:|--:|--:|--:|"]
    for r in result["rows"]:
        lines.append(f"| {r['variant']} | {r['tokens_per_s']:,.0f} | "
                     f"{r['peak_memory_bytes'] / gb:.2f} | {r['mfu']:.0%} | "
                     f"{r['mean_loss']:.4f} | {r['loadavg_before'][0]:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
