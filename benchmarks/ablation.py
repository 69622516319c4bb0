"""What each of peftkit's choices buys: the peftkit side of one benchmark, run with its
optimisations switched on one at a time (each variant in its own fresh process).

    python benchmarks/ablation.py                  # small / varlen / LoRA
    python benchmarks/ablation.py --entry "tiny / varlen / LoRA"

Variants switch peftkit's own settings (data.packing) and module constants (loss.py's
HEAD_ONLY_ARCHS, head_loss.py's CHUNK_LOGITS, packing.py's kernel choice, fused_lora.ENABLED,
allocator.ENABLED)
in the child process; nothing of transformers or peft is touched. Results: benchmarks/results/ablation-*.json.
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

# name -> (data.packing, LM head only on labelled positions, chunked head, kernel,
#          LoRA update fused into its matmul, freed memory kept, overrides)
EAGER = ("train.compile=false",)
COMPILED = ("train.compile=true",)
VARIANTS = {
    "padded batches, full logits (Trainer-like)": (False, False, False, None, False, False,
                                                   EAGER),
    "+ LM head only on labelled positions": (False, True, False, None, False, False, EAGER),
    "+ packing, transformers' block mask": (True, True, False, "block-mask", False, False,
                                            EAGER),
    "+ packing, attention per sample": (True, True, False, "segments", False, False, EAGER),
    "+ chunked LM head and loss": (True, True, True, "segments", False, False, EAGER),
    "+ LoRA update fused into its matmul": (True, True, True, "segments", True, False, EAGER),
    "+ train.compile": (True, True, True, "segments", True, False, COMPILED),
    "+ freed memory kept (= the benchmark recipe)": (True, True, True, "segments", True, True,
                                                     COMPILED),
    "+ gradient checkpointing": (True, True, True, "segments", True, True,
                                 (*COMPILED, "train.gradient_checkpointing=true")),
}


def apply_variant(name: str) -> list[str]:
    """Patch peftkit's own switches for `name` (in this child process); returns overrides."""
    from peftkit.model import fused_lora
    from peftkit.model import head_loss
    from peftkit.training import loss
    from peftkit.data import packing
    from peftkit.model import allocator

    packed, head_only, chunked, kernel, fused, keep, overrides = VARIANTS[name]
    fused_lora.ENABLED = fused
    allocator.ENABLED = keep
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
    from peftkit.bench.side import run_side
    from peftkit.recipe.schema import recipe_from_dict
    from peftkit.recipe.overrides import apply_overrides

    spec = json.loads(Path(spec_path).read_text())
    recipe = apply_overrides(recipe_from_dict(spec["recipe"]), apply_variant(name))
    Path(out_path).write_text(json.dumps(run_side("peftkit", recipe, spec["source"])))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entry", default="small / varlen / LoRA")
    parser.add_argument("--max-load", type=float, default=0.6)
    parser.add_argument("--max-wait", type=float, default=600)
    parser.add_argument("--only", default="", help="rerun the variants whose name contains "
                        "this and replace their rows in the existing results")
    parser.add_argument("--repeat", type=int, default=1, help="run the variants N times, "
                        "round-robin (so a drifting machine drifts for all of them); each row "
                        "is then the run of median tokens/s (the lower middle one for an even N), with the "
                        "min-max spread")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)

    import torch

    from peftkit.bench import harness as bench
    from peftkit.recipe import registry
    from peftkit.recipe.overrides import apply_overrides
    from peftkit.bench.flops import matmul_peak
    from peftkit.model.loading import base_path

    entry = suite.entry(args.entry)
    found = registry.resolve(entry.path)
    rows = []
    with tempfile.TemporaryDirectory(prefix="peftkit-ablation-") as tmp:
        recipe = bench.bench_recipe(apply_overrides(found.recipe, list(entry.overrides)),
                                    entry.steps, tmp)
        base_path(recipe.model)
        recipe, work = bench.select_samples(recipe, tmp)
        per_token, _ = bench.flops_per_token(recipe, work)
        peaks = [matmul_peak(torch.device("cpu"))["best_flops"]]
        spec = Path(tmp) / "spec.json"
        spec.write_text(json.dumps({"recipe": recipe.to_dict(), "source": entry.path}))
        runs: dict[str, list[dict]] = {}
        names = [v for v in VARIANTS if args.only in v]
        for round_ in range(args.repeat):
            for name in names:
                load = suite.wait_for_quiet(args.max_load, args.max_wait)
                print(f"== {name} (round {round_ + 1}/{args.repeat}, load {load:.2f})",
                      file=sys.stderr, flush=True)
                out = Path(tmp) / "out.json"
                subprocess.run([sys.executable, __file__, "--child", name, str(spec),
                                str(out)], check=True)
                runs.setdefault(name, []).append(json.loads(out.read_text()))
        peaks.append(matmul_peak(torch.device("cpu"))["best_flops"])
        peak = max(peaks)  # the MFU denominator: best of before and after, as bench.py
        for name, sides in runs.items():
            summaries = [bench.summarise(side, recipe, per_token, peak) for side in sides]
            speeds = sorted(s["tokens_per_s"] for s in summaries)
            median = sorted(summaries, key=lambda s: s["tokens_per_s"])[(len(sides) - 1) // 2]
            problems = [p for side in sides for p in bench.equal_work(
                work, {"peftkit": side}, entry.steps, mixed=False).problems]
            rows.append({"variant": name, **median, "runs": len(sides),
                         "tokens_per_s_min": speeds[0], "tokens_per_s_max": speeds[-1],
                         "problems": problems})
    path = HERE / "results" / f"ablation-{entry.slug}.json"
    if args.only and path.is_file():  # keep the other rows; recompute MFU on one denominator
        old = json.loads(path.read_text())
        peak = max(peak, old["matmul_peak_flops"])
        known = {r["variant"]: r for r in old["rows"]} | {r["variant"]: r for r in rows}
        rows = [known[v] for v in VARIANTS if v in known]  # in VARIANTS order
        for r in rows:
            r["mfu"] = r["model_flops_per_s"] / peak
    result = {"entry": entry.label, "matmul_peak_flops": peak, "repeat": args.repeat,
              "rows": rows,
              "environment": bench.environment()}
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(markdown(result))
    return 0


def markdown(result: dict) -> str:
    gb = 1024 ** 3
    env = result.get("environment", {})
    lines = [f"Ablation, {result['entry']} (peftkit's loop; each row adds one change; "
             f"{env.get('device', 'unknown host')}):", "",
             "| variant | useful tok/s | peak memory GB | page faults | MFU | mean loss | load |",
             "|---|--:|--:|--:|--:|--:|--:|"]
    for r in result["rows"]:
        spread = (f" ({r['tokens_per_s_min']:,.0f}-{r['tokens_per_s_max']:,.0f})"
                  if r.get("runs", 1) > 1 else "")
        faults = f"{r['page_faults'] / 1e3:,.0f}k" if r.get("page_faults") else "-"
        lines.append(f"| {r['variant']} | {r['tokens_per_s']:,.0f}{spread} | "
                     f"{r['peak_memory_bytes'] / gb:.2f} | {faults} | {r['mfu']:.0%} | "
                     f"{r['mean_loss']:.4f} | {r['loadavg_before'][0]:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
