"""Where a peftkit training step's time goes: the peftkit side of one benchmark, in this
process, with torch.profiler over the steps after the first (which pays the compile).

    python benchmarks/profile_step.py                         # small / varlen / LoRA
    python benchmarks/profile_step.py --entry "real / chitchat / LoRA" --steps 4
    python benchmarks/profile_step.py train.compile=false     # any recipe override

Prints the profiled steps' wall time split into phases (data collation, forward + loss,
backward, gradient norm, optimizer) and the operators' self CPU time grouped into kinds
(matmuls, attention, compiled regions, elementwise, optimizer, ...); "outside operators" is
the wall time no operator accounts for (Python, autograd bookkeeping, hooks). Optionally
writes a Chrome trace (--trace FILE) to open in https://ui.perfetto.dev.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import suite  # noqa: E402

# Operator name -> kind: a compiled region by its name, aten operators by their base name
# (aten::add_ -> add); first match wins.
COMPILED = ("CompiledFunction", "Torch-Compiled Region", "CompiledFxGraph", "TorchDynamo")
KINDS = (
    ("matmul", {"mm", "addmm", "addmm_", "bmm", "matmul", "linear", "baddbmm", "addmv", "mv"}),
    ("attention", {"_scaled_dot_product_flash_attention_for_cpu",
                   "_scaled_dot_product_flash_attention_for_cpu_backward",
                   "scaled_dot_product_attention", "_scaled_dot_product_attention_math"}),
    ("optimizer", {"_fused_adamw", "_foreach_add", "_foreach_mul", "_foreach_lerp",
                   "_foreach_addcmul", "_foreach_addcdiv", "_foreach_sqrt", "_foreach_div",
                   "lerp", "addcdiv", "addcmul", "_foreach_norm"}),
    ("loss / softmax", {"cross_entropy", "log_softmax", "_log_softmax", "nll_loss",
                        "nll_loss_forward", "nll_loss_backward", "_log_softmax_backward_data",
                        "logsumexp", "exp", "amax", "softmax", "_softmax"}),
    ("copy / layout", {"copy_", "contiguous", "clone", "cat", "stack", "_to_copy", "to",
                       "index", "index_select", "gather", "scatter", "narrow", "slice",
                       "select", "view", "reshape", "transpose", "permute", "expand",
                       "split", "split_with_sizes", "unbind", "as_strided", "t", "detach",
                       "empty", "empty_like", "empty_strided", "zeros", "zeros_like", "ones",
                       "fill_", "zero_", "new_zeros", "new_empty", "resize_", "squeeze",
                       "unsqueeze", "item", "_local_scalar_dense", "arange", "full",
                       "index_put_", "_index_put_impl_", "masked_select", "nonzero"}),
)


LEAF_MATMULS = {"mm", "addmm", "addmm_", "bmm", "baddbmm"}


def kind_of(name: str) -> str:
    if any(k in name for k in COMPILED):
        return "compiled region"
    base = name.removeprefix("aten::")
    for kind, names in KINDS:
        if base in names:
            return kind
    return "elementwise / other" if name.startswith("aten::") else "framework"


def phase_timers(state_box: dict):
    """Patch the loop's pieces so each phase's wall time is summed into state_box."""
    import torch

    from peftkit.training import distributed, loop
    from peftkit.training.objectives import NextTokenObjective

    totals = state_box.setdefault("phases", defaultdict(float))

    def timed(name, fn):
        def wrapper(*a, **k):
            if not state_box.get("on"):
                return fn(*a, **k)
            began = time.perf_counter()
            with torch.profiler.record_function(f"phase: {name}"):
                out = fn(*a, **k)
            totals[name] += time.perf_counter() - began
            return out
        return wrapper

    NextTokenObjective.collate = timed("collate", NextTokenObjective.collate)
    distributed.backward = timed("backward", distributed.backward)
    real_accumulate = loop._accumulate

    def accumulate(state, window):
        opt = state.opt
        if not getattr(opt, "_profiled", False):
            opt._profiled = True
            opt.loss_module.forward = timed("forward + loss", opt.loss_module.forward)
            acc = state.run.accelerator
            acc.clip_grad_norm_ = timed("gradient norm", acc.clip_grad_norm_)
            opt.optimizer.step = timed("optimizer step", opt.optimizer.step)
            opt.optimizer.zero_grad = timed("zero_grad", opt.optimizer.zero_grad)
        # Profiled: from the start of step skip + 1 to the start of the last step (which also
        # saves the checkpoint, outside the benchmark's timed steps).
        state_box["steps"] = n = state_box.get("steps", 0) + 1
        if n == state_box["skip"] + 1:
            state_box["on"], state_box["began"] = True, time.perf_counter()
            state_box["profiler"].start()
        elif n == state_box["last"]:
            state_box["wall"] = time.perf_counter() - state_box["began"]
            state_box["profiler"].stop()
            state_box["on"] = False
        return real_accumulate(state, window)

    loop._accumulate = accumulate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entry", default="small / varlen / LoRA")
    parser.add_argument("--steps", type=int, default=7, help="optimizer steps in all (the "
                        "first --skip and the last are not profiled)")
    parser.add_argument("--skip", type=int, default=2, help="steps before profiling starts")
    parser.add_argument("--trace", default="", help="write a Chrome trace here")
    parser.add_argument("--top", type=int, default=25, help="operators to list")
    parser.add_argument("--shapes-of", default="aten::copy_", help="also list this "
                        "operator's calls by input shapes (default aten::copy_)")
    parser.add_argument("overrides", nargs="*", help="recipe overrides, key=value")
    args = parser.parse_args()

    import torch
    from rich.console import Console

    from peftkit.bench import harness as bench
    from peftkit.recipe import registry
    from peftkit.recipe.overrides import apply_overrides
    from peftkit.training import loop

    entry = suite.entry(args.entry)
    found = registry.resolve(entry.path)
    box = {"skip": args.skip, "last": args.steps,
           "profiler": torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                              record_shapes=True)}
    phase_timers(box)
    with tempfile.TemporaryDirectory(prefix="peftkit-profile-") as tmp:
        recipe = bench.bench_recipe(apply_overrides(
            found.recipe, [*entry.overrides, *args.overrides]), args.steps, tmp)
        recipe, _ = bench.select_samples(recipe, tmp)
        loop.train(recipe, entry.path, overwrite=True, console=Console(stderr=True))
    report(box, args.steps - 1 - args.skip, args.top, args.trace, args.shapes_of)
    return 0


def report(box: dict, steps: int, top: int, trace: str, shapes_of: str) -> None:
    prof, wall = box["profiler"], box["wall"]
    events = [e for e in prof.key_averages() if not e.key.startswith("phase: ")]
    by_kind: dict[str, float] = defaultdict(float)
    for e in events:
        by_kind[kind_of(e.key)] += e.self_cpu_time_total / 1e6
    ops = sum(by_kind.values())
    print(f"\n{steps} profiled steps, {wall:.2f} s wall ({wall / steps:.3f} s/step)\n")
    print("| phase | s/step | share |\n|---|--:|--:|")
    for name, s in sorted(box["phases"].items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {s / steps:.3f} | {s / wall:.1%} |")
    rest = wall - sum(box["phases"].values())
    print(f"| rest of the loop | {rest / steps:.3f} | {rest / wall:.1%} |")
    print("\n| operator kind (self CPU time) | s/step | share of wall |\n|---|--:|--:|")
    for kind, s in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"| {kind} | {s / steps:.3f} | {s / wall:.1%} |")
    print(f"| outside operators (Python, autograd, hooks) | {(wall - ops) / steps:.3f} | "
          f"{(wall - ops) / wall:.1%} |")
    print(f"\n| top operators | calls/step | s/step | kind |\n|---|--:|--:|---|")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]:
        print(f"| {e.key[:70]} | {e.count / steps:.0f} | "
              f"{e.self_cpu_time_total / 1e6 / steps:.3f} | {kind_of(e.key)} |")
    # Leaf matmul kernels only (aten::linear / aten::matmul call these; their own time is ~0).
    by_shape = prof.key_averages(group_by_input_shape=True)
    mms = [e for e in by_shape if e.key.removeprefix("aten::") in LEAF_MATMULS]
    groups: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for e in mms:
        dims = {d for sh in e.input_shapes if isinstance(sh, list) for d in sh}
        group = ("LM head (a vocabulary-sized dimension)" if max(dims, default=0) >= 16384
                 else "thin (a dimension <= 64: adapters)" if min(dims, default=0) <= 64
                 else "base layers")
        groups[group][0] += e.self_cpu_time_total / 1e6
        groups[group][1] += matmul_flops(e.key, e.input_shapes) * e.count
    print("\n| matmuls | s/step | share of wall | GFLOP/s |\n|---|--:|--:|--:|")
    for group, (s, flops) in sorted(groups.items(), key=lambda kv: -kv[1][0]):
        print(f"| {group} | {s / steps:.3f} | {s / wall:.1%} | {flops / s / 1e9:.0f} |")
    print("\n| matmul, input shapes | calls/step | s/step | GFLOP/s |\n|---|--:|--:|--:|")
    for e in sorted(mms, key=lambda e: -e.self_cpu_time_total)[:top]:
        flops = matmul_flops(e.key, e.input_shapes) * e.count
        rate = flops / (e.self_cpu_time_total / 1e6) / 1e9 if e.self_cpu_time_total else 0
        print(f"| {e.key.removeprefix('aten::')} {e.input_shapes} | {e.count / steps:.0f} | "
              f"{e.self_cpu_time_total / 1e6 / steps:.3f} | {rate:.0f} |")
    if shapes_of:
        print(f"\n| {shapes_of}, input shapes | calls/step | s/step |\n|---|--:|--:|")
        calls = [e for e in by_shape if e.key == shapes_of]
        for e in sorted(calls, key=lambda e: -e.self_cpu_time_total)[:top]:
            print(f"| {e.input_shapes} | {e.count / steps:.0f} | "
                  f"{e.self_cpu_time_total / 1e6 / steps:.3f} |")
    if trace:
        prof.export_chrome_trace(trace)
        print(f"\ntrace: {trace}")


def matmul_flops(name: str, shapes: list) -> float:
    """FLOPs of one mm / addmm / bmm call from its recorded input shapes (0 if unknown)."""
    mats = [sh for sh in shapes if isinstance(sh, list) and len(sh) >= 2]
    if name.endswith("addmm") and len(mats) >= 3:
        mats = mats[1:]
    if len(mats) < 2:
        return 0.0
    a, b = mats[0], mats[1]
    batch = a[0] if len(a) == 3 else 1
    return 2.0 * batch * a[-2] * a[-1] * b[-1]


if __name__ == "__main__":
    raise SystemExit(main())
