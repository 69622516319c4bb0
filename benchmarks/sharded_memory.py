"""Peak memory of each training process under DDP, FSDP2 and DeepSpeed ZeRO-3, at 2 and 4
processes, with FSDP2 loading the base in every process ("before": launch.efficient_loading=
false) and in the main process only (the default), side by side in one invocation.

    python benchmarks/sharded_memory.py                       # SmolLM2-135M, 2 and 4 processes
    python benchmarks/sharded_memory.py --nproc 2 --steps 2   # quicker
    python benchmarks/sharded_memory.py --recipe tiny-demo --overrides model.tiny_size=m
    python benchmarks/sharded_memory.py --nproc 2 --malloc-mmap-threshold 65536

Each configuration is a real `accelerate launch` of N workers (the command `peftkit train
--nproc N` runs, with this file as the worker instead of `-m peftkit train`). Each worker
imports everything training needs (torch, transformers, peft, accelerate, DeepSpeed, the
model's modelling code), takes its RSS as the baseline, resets the kernel's peak-RSS counter
(/proc/self/clear_refs), runs peftkit's `train()` for a few steps, and reports its peak RSS
(VmHWM) above the baseline, plus the peak of its anonymous (unshared) memory sampled every
20 ms: RSS also counts pages of the mmapped weights file, which processes on one machine
share. Results: benchmarks/results/sharded-memory/<recipe>.json. Linux only (reads /proc).

glibc's malloc keeps freed memory in its arenas and RSS counts it: FSDP2 and ZeRO-3 allocate
and free a layer's gathered weights at every layer, and under the default (dynamic) mmap
threshold that cached memory, not the weights, sets their peak. --malloc-mmap-threshold 65536
measures with large blocks returned at once.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# The real model, a few short steps: what matters is memory, which does not grow with steps.
SETTINGS = ("train.batch_size=1", "train.grad_accum=1", "train.log_every=1",
            "train.warmup_steps=0", "train.eval_generate=0", "train.save_every=0",
            "train.forgetting=false", "data.max_samples=64", "data.max_len=64")
# name -> (launch.strategy, its settings)
STRATEGIES = {
    "DDP": ("ddp", ()),
    "FSDP2, every process loads the base": ("fsdp", ("launch.efficient_loading=false",)),
    "FSDP2, main process loads the base": ("fsdp", ("launch.efficient_loading=true",)),
    "ZeRO-3": ("deepspeed", ("launch.zero_stage=3",)),
}


# --- inside each worker -------------------------------------------------------------------

def _status() -> dict:
    """Fields of /proc/self/status in bytes (VmRSS, VmHWM, RssAnon, ...)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if value.strip().endswith("kB"):
            out[key] = int(value.split()[0]) * 1024
    return out


class AnonPeak:
    """The largest RssAnon seen, sampled every 20 ms on a thread (the kernel keeps no peak
    of it)."""

    def __init__(self):
        self.peak, self._stop = _status()["RssAnon"], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _status()["RssAnon"])

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, _status()["RssAnon"])


def worker(spec: dict) -> None:
    import accelerate  # noqa: F401  everything training imports counts in the baseline
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401
    if spec["strategy"] == "deepspeed":
        import deepspeed  # noqa: F401

    from peftkit.recipe import registry
    from peftkit.recipe.overrides import apply_overrides
    from peftkit.training.loop import train

    recipe = apply_overrides(registry.resolve(spec["recipe"]).recipe, spec["overrides"])
    baseline = _status()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM restarts from the current RSS
    anon = AnonPeak()
    started = time.process_time()
    train(recipe, overwrite=True)
    anon_peak, now = anon.stop(), _status()
    rank = int(os.environ["RANK"])
    Path(spec["out"], f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "baseline_rss": baseline["VmRSS"], "peak_rss": now["VmHWM"],
        "peak_rss_above_baseline": now["VmHWM"] - baseline["VmRSS"],
        "peak_anon_above_baseline": anon_peak - baseline["RssAnon"],
        "cpu_seconds": round(time.process_time() - started, 1)}))


# --- the driver -----------------------------------------------------------------------------

def launch(name: str, nproc: int, args, runs: Path) -> dict:
    """One configuration: N workers through accelerate launch; their reports."""
    from peftkit.training import launcher

    strategy, extra = STRATEGIES[name]
    out = Path(tempfile.mkdtemp(prefix="sharded-memory-", dir=runs))
    overrides = [*SETTINGS, f"train.max_steps={args.steps}", f"train.output_dir={out}",
                 f"launch.strategy={strategy}", *extra, *args.overrides]
    topology = launcher.Topology(nproc=nproc, strategy=strategy, zero_stage=3)
    cmd, env = launcher.accelerate_command(topology, [], cuda=False)
    assert cmd[-3:] == ["-m", "peftkit", "train"]
    spec = {"recipe": args.recipe, "overrides": overrides, "strategy": strategy,
            "out": str(out)}
    cmd = [*cmd[:-3], str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    print(f"{name}, {nproc} processes ...", file=sys.stderr, flush=True)
    started = time.time()
    if args.malloc_mmap_threshold:  # glibc: blocks this big or bigger go back to the system
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    proc = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{name}, {nproc} processes failed:\n{proc.stderr[-3000:]}")
    ranks = sorted((json.loads(p.read_text()) for p in out.glob("rank*.json")),
                   key=lambda r: r["rank"])
    assert len(ranks) == nproc, proc.stderr[-3000:]
    return {"strategy": name, "processes": nproc, "overrides": overrides,
            "wall_seconds": round(time.time() - started, 1), "ranks": ranks}


def table(rows: list[dict]) -> str:
    """Markdown: per-process peak RSS above baseline (max over processes; main; others)."""
    mb = 1024 ** 2
    lines = ["| strategy | processes | main process | each other process (max) | "
             "unshared (anon), max |", "|---|---|---|---|---|"]
    for row in rows:
        ranks = row["ranks"]
        others = max(r["peak_rss_above_baseline"] for r in ranks[1:])
        anon = max(r["peak_anon_above_baseline"] for r in ranks)
        lines.append(f"| {row['strategy']} | {row['processes']} | "
                     f"{ranks[0]['peak_rss_above_baseline'] / mb:.0f} MiB | {others / mb:.0f} MiB "
                     f"| {anon / mb:.0f} MiB |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="demo", help="recipe name (default: demo, "
                        "SmolLM2-135M-Instruct, 538 MB in float32)")
    parser.add_argument("--overrides", nargs="*", default=[], help="section.field=value ...")
    parser.add_argument("--nproc", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES),
                        choices=list(STRATEGIES))
    parser.add_argument("--out", default=None, help="result JSON (default: benchmarks/results/"
                        "sharded-memory/RECIPE.json)")
    parser.add_argument("--malloc-mmap-threshold", type=int, default=0, metavar="BYTES",
                        help="set glibc's MALLOC_MMAP_THRESHOLD_ in the workers (e.g. 65536): "
                        "freed blocks of that size or more go back to the system at once "
                        "instead of staying cached in malloc's arenas, which RSS counts")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))

    from peftkit.bench.harness import environment

    with tempfile.TemporaryDirectory(prefix="sharded-memory-") as runs:
        rows = [launch(name, n, args, Path(runs)) for n in args.nproc for name in args.strategies]
    result = {"recipe": args.recipe, "steps": args.steps,
              "malloc_mmap_threshold": args.malloc_mmap_threshold or "glibc default (dynamic)",
              "measure": "per process: peak RSS (VmHWM, reset after imports) above the RSS "
                         "after imports; unshared: peak RssAnon sampled every 20 ms",
              "load_average_at_end": os.getloadavg()[0], "environment": environment(),
              "rows": rows, "table": table(rows)}
    out = Path(args.out or HERE / "results" / "sharded-memory" / f"{args.recipe}.json")
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(result["table"])
    print(f"written: {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
