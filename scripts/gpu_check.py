"""The GPU check, in one call of about 8 minutes on a lent GPU machine (one H100/H200).

    bash scripts/gpu_check.sh                  # on the GPU machine (installs carried wheels)
    python scripts/gpu_check.py --tiny --out /tmp/gpu-check   # dry run on CPU, ~1-2 min

What it runs, in order of what matters most (each stage in its own process, with a timeout
taken from one overall budget; a stage that no longer fits is skipped and says so):

1. env: versions and the device; random-weight Llama-3.2-1B and Llama-3.1-8B shapes
   (peftkit's table of published shapes), built in bf16 on the GPU and saved with peftkit's
   tokenizer;
2. memory: `peftkit train` of llama3-8b-lora (bf16 LoRA) and llama3-8b-qlora (NF4 QLoRA) on
   both shapes at micro-batch 2 x 2048 tokens, 3 steps: the measured peak
   (`torch.cuda.max_memory_allocated`, result.json) next to `peftkit show`'s bf16-GPU
   estimate; and 8B QLoRA with train.offload_activations;
3. fsdp: FSDP2 with one process (llama3-8b-lora on the 1B shape);
4. bench: `peftkit bench --vs hf,trl` on the 1B shape; if that is refused (no trl side, trl
   not installed) or fails, the bench runs `--vs hf` and the result says why;
5. tests: `pytest -m gpu` (tests/test_gpu_memory.py and the other GPU-marked tests);
6. extra: 8B LoRA offloaded, 8B QLoRA with the float32 upcast of peft's preparation.

Results go to OUT (default $OUT, else ./gpu-check-out): gpu-check.json (everything, written
after every stage, so a timeout still leaves what ran), gpu-check.log (each stage's output),
bench-1b.json and its plot. Commit them under benchmarks/results/gpu/. `--tiny` runs the same
stages on CPU with scaled-down shapes and 64-token samples: the dry run tests/test_gpu_check.py
runs before any GPU time is spent.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {"1b": "meta-llama/Llama-3.2-1B-Instruct", "8b": "meta-llama/Llama-3.1-8B-Instruct"}
# Scaled-down stand-ins for --tiny (CPU): same classes and code paths, tied head as in 1B.
TINY_SHAPES = {
    "1b": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, head_dim=16,
               num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "8b": dict(hidden_size=96, intermediate_size=192, num_hidden_layers=2, head_dim=24,
               num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
}
# (shape, recipe, extra overrides), most important first.
MEMORY_RUNS = [
    ("8b", "llama3-8b-qlora", []),
    ("8b", "llama3-8b-lora", []),
    ("1b", "llama3-8b-lora", []),
    ("1b", "llama3-8b-qlora", []),
    ("8b", "llama3-8b-qlora", ["train.offload_activations=true"]),
]
# Run last, if the budget still has room: offloading on LoRA, and the old float32 upcast.
EXTRA_RUNS = [
    ("8b", "llama3-8b-lora", ["train.offload_activations=true"]),
    ("8b", "llama3-8b-qlora", ["model.upcast_unquantized=true"]),
]
# In this order: what the goals are measured by first; env builds the models too.
STAGES = ("env", "memory", "fsdp", "bench", "tests", "extra")


class Check:
    """The overall budget, the results file and the log."""

    def __init__(self, out: Path, budget: float, tiny: bool):
        self.out, self.tiny = out, tiny
        self.deadline = time.monotonic() + budget
        self.runs = len(MEMORY_RUNS)  # how many of the memory runs to do
        self.work = Path(os.environ.get("GPU_CHECK_WORK", "/tmp/peftkit-gpu-check"))
        self.work.mkdir(parents=True, exist_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        self.log = open(out / "gpu-check.log", "a")
        self.results = {"tiny": tiny, "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                        "budget_seconds": budget, "stages": {}, "memory": []}
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [p for p in (os.environ.get("PYTHONPATH"), str(ROOT)) if p]),
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
            "TOKENIZERS_PARALLELISM": "false", "PEFTKIT_CACHE": str(self.work / "cache")}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def save(self) -> None:
        self.results["seconds_left"] = round(self.left(), 1)
        (self.out / "gpu-check.json").write_text(json.dumps(self.results, indent=1) + "\n")

    def run(self, name: str, argv: list[str], limit: float) -> dict:
        """Run `argv` with at most `limit` seconds (less if the budget has less)."""
        timeout = min(limit, self.left())
        if timeout < min(20.0, limit):
            return {"ok": False, "skipped": f"out of time ({self.left():.0f} s left)"}
        self.log.write(f"\n===== {name}: {' '.join(argv)}\n")
        self.log.flush()
        began = time.monotonic()
        try:
            proc = subprocess.run(argv, cwd=ROOT, env=self.env, timeout=timeout, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            rc, output = proc.returncode, proc.stdout
        except subprocess.TimeoutExpired as exc:
            output = exc.output or ""
            rc, output = None, output.decode(errors="replace") if isinstance(output, bytes) \
                else output
        self.log.write(output[-200_000:])
        self.log.flush()
        tail = "\n".join(output.strip().splitlines()[-12:])
        return {"ok": rc == 0, "rc": rc, "seconds": round(time.monotonic() - began, 1),
                "timed_out": rc is None, "tail": tail, "output": output}

    def stage(self, name: str, result: dict) -> dict:
        result.pop("output", None)  # in gpu-check.log
        self.results["stages"][name] = result
        self.save()
        state = "ok" if result.get("ok") else result.get("skipped") or f"FAILED rc={result.get('rc')}"
        print(f"[{self.left():5.0f} s left] {name}: {state}", flush=True)
        return result


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


# ---------------------------------------------------------------------------------------------
# Stages

PREPARE = """\
import json, platform, sys
from pathlib import Path
import torch, transformers, peft, accelerate
from transformers import AutoConfig
from peftkit.model.shapes import known_config
from peftkit.model.tiny import build_random

versions = {m.__name__: m.__version__ for m in (torch, transformers, peft, accelerate)}
for name in ("bitsandbytes", "trl", "datasets"):
    try:
        versions[name] = __import__(name).__version__
    except Exception as exc:
        versions[name] = f"missing ({type(exc).__name__})"
cuda = torch.cuda.is_available()
print("ENV " + json.dumps({"versions": versions, "python": platform.python_version(),
    "cuda": torch.version.cuda, "device": torch.cuda.get_device_name(0) if cuda else "cpu",
    "device_memory_bytes": torch.cuda.get_device_properties(0).total_memory if cuda else 0}),
    flush=True)
for name, dims, target in json.loads(sys.argv[1]):
    config = AutoConfig.for_model("llama", vocab_size=4096, max_position_embeddings=4096,
                                  **dims) if dims else known_config(name)
    print("MODEL " + str(build_random(config, Path(target), "cuda" if cuda else "cpu")),
          flush=True)
"""


def stage_env(check: Check) -> None:
    """Versions and device, and the random-weight models (one process: one import)."""
    models = {shape: check.work / "models" / (f"tiny-{shape}" if check.tiny else shape)
              for shape in SHAPES}
    jobs = [(SHAPES[s], TINY_SHAPES[s] if check.tiny else {}, str(p)) for s, p in models.items()]
    result = check.run("env+models", python("-c", PREPARE, json.dumps(jobs)), 300)
    lines = result.get("output", "").splitlines()
    env = [json.loads(line[4:]) for line in lines if line.startswith("ENV ")]
    check.results["env"] = {**(env[0] if env else {}), "machine": platform.machine()}
    built = {line[6:] for line in lines if line.startswith("MODEL ")}
    if all(str(p) in built for p in models.values()):
        check.results["models"] = {s: str(p) for s, p in models.items()}
    else:
        result["ok"] = False
    check.stage("env", result)


def long_text(check: Check, tokens: int) -> Path:
    """Rows of at least `tokens` tokens, so every micro-batch is full (data.format=text)."""
    path = check.work / f"text-{tokens}.jsonl"
    words = ("the quick brown fox jumps over a lazy dog while numbers sort and lists "
             "reverse").split()
    rows = [" ".join(words[(i * 7 + j) % len(words)] for j in range(2 * tokens))
            for i in range(64)]
    path.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    return path


def train_overrides(check: Check, shape: str, steps: int) -> list[str]:
    tokens = 64 if check.tiny else 2048
    return [f"model.name={check.results['models'][shape]}", "model.arch=llama",
            f"data.train={long_text(check, tokens)}", "data.format=text",
            f"data.max_len={tokens}", "data.eval_size=0", "train.batch_size=2",
            "train.grad_accum=1", f"train.max_steps={steps}", "train.warmup_steps=0",
            "train.eval_every=0", "train.save_every=0", "train.forgetting=false",
            f"train.output_dir={check.work / 'runs'}"]


def show_estimate(recipe_name: str, overrides: list[str]) -> dict:
    """`peftkit show`'s bf16-GPU column for the recipe (the same function, in process)."""
    from peftkit.model.loading import resolve_precision
    from peftkit.model.memory import estimate
    from peftkit.model.summary import base_config
    from peftkit.recipe import registry
    from peftkit.recipe.overrides import apply_overrides

    recipe = apply_overrides(registry.resolve(recipe_name).recipe, overrides)
    config, _ = base_config(recipe)
    precision = resolve_precision(recipe.model, recipe.launch, "cuda", bf16_ok=True)
    return estimate(recipe, config, precision, "cuda").to_dict()


def train_run(check: Check, label: str, recipe: str, overrides: list[str], limit: float,
              extra: tuple = ()) -> dict:
    """`peftkit train` in a fresh process; its result.json's memory and speed."""
    result = check.run(label, python("-m", "peftkit", "train", recipe, *overrides,
                                     f"name={label.replace(':', '-')}", "--overwrite",
                                     *extra), limit)
    result.pop("output", None)
    path = check.work / "runs" / label.replace(":", "-") / "result.json"
    if result.get("ok") and path.is_file():
        saved = json.loads(path.read_text())
        result.update(memory=saved["memory"], tokens_per_s=saved["tokens_per_s"],
                      train_loss=saved["train_loss"])
    return result


def stage_memory(check: Check, runs: list | None = None, stage: str = "memory") -> None:
    rows = check.results["memory"]
    first = len(rows)
    for shape, recipe, extra in (MEMORY_RUNS[:check.runs] if runs is None else runs):
        overrides = train_overrides(check, shape, 3) + extra
        label = f"memory:{shape}-{recipe.split('-')[-1]}" + "".join(
            "-" + e.split(".")[-1].split("=")[0] for e in extra)
        result = train_run(check, label, recipe, overrides, 150 if shape == "8b" else 90)
        row = {"shape": SHAPES[shape], "recipe": recipe, "overrides": extra,
               "micro_batch": "2 x 64" if check.tiny else "2 x 2048", **result}
        try:
            row["show_estimate_bf16_gpu"] = show_estimate(recipe, overrides)
        except Exception as exc:  # noqa: BLE001 - recorded, the check goes on
            row["show_estimate_bf16_gpu"] = {"error": f"{type(exc).__name__}: {exc}"}
        memory = result.get("memory")
        if memory:
            measured = memory["measured"]["above_baseline_bytes"]
            row["measured_peak_bytes"] = measured
            row["measured_over_show_estimate"] = measured / max(
                1, row["show_estimate_bf16_gpu"].get("total_bytes", 0))
        rows.append(row)
        check.stage(label, {k: v for k, v in result.items() if k != "memory"})
    check.stage(stage, {"ok": all(r.get("ok") for r in rows[first:]),
                        "runs": len(rows) - first})


def stage_extra(check: Check) -> None:
    stage_memory(check, EXTRA_RUNS, "extra")


def stage_tests(check: Check) -> None:
    targets = ["tests/test_gpu_memory.py"] if check.tiny else ["tests/"]
    check.stage("tests", check.run("tests", python(
        "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *targets), 150))


def stage_fsdp(check: Check) -> None:
    overrides = train_overrides(check, "1b", 2) + ["launch.strategy=fsdp"]
    # One process on a GPU; on CPU FSDP needs two (gloo), which is what --tiny checks.
    extra = ("--nproc", "2") if check.tiny else ()
    result = train_run(check, "fsdp:1b-lora", "llama3-8b-lora", overrides, 120, extra)
    check.stage("fsdp", result)


def stage_bench(check: Check) -> None:
    model = check.results["models"]["1b"]
    out = check.out / "bench-1b.json"
    argv = ["-m", "peftkit", "bench", "benchmarks/recipes/small.py", f"model.name={model}",
            "model.tiny=false", "model.arch=llama", "train.compile=false",
            "--steps", "2" if check.tiny else "3", "--out", str(out)]
    if check.tiny:
        argv += ["data.max_len=64", "train.batch_size=2", "--inline"]
    result = check.run("bench:hf,trl", python(*argv, "--vs", "hf,trl"), 200)
    if not result["ok"] and not result.get("skipped"):
        # Refused (exit 2: no trl side, or trl not installed) or broken: the hf side alone.
        why = "was refused" if result.get("rc") == 2 else f"failed (rc={result.get('rc')})"
        last = (result["tail"].splitlines() or [""])[-1]
        result = {**check.run("bench:hf", python(*argv, "--vs", "hf"), 180),
                  "note": f"--vs trl {why}: {last}"}
    if out.is_file():  # the headline numbers (the whole file comes back next to this one)
        bench = json.loads(out.read_text())
        result["bench"] = {"ratios": bench.get("ratios"), "equal_work": bench.get("equal_work"),
                           "sides": {name: {k: side.get(k) for k in (
                               "tokens_per_s", "peak_memory_bytes", "mfu", "mean_loss")}
                               for name, side in bench.get("sides", {}).items()}}
    check.stage("bench", result)


def summary_table(rows: list[dict]) -> str:
    """Markdown: each memory run's measured peak next to `peftkit show`'s estimate."""
    gib = 1024 ** 3
    lines = ["| model shape | recipe | extra | measured peak GiB | estimate GiB | measured / "
             "estimate | tokens/s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        est = r.get("show_estimate_bf16_gpu", {}).get("total_bytes")
        measured = r.get("measured_peak_bytes")
        cells = [r["shape"].split("/")[-1], r["recipe"], " ".join(r["overrides"]) or "-",
                 f"{measured / gib:.2f}" if measured else r.get("skipped") or "failed",
                 f"{est / gib:.2f}" if est else "-",
                 f"{measured / est:.2f}" if measured and est else "-",
                 f"{r.get('tokens_per_s', 0):,.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true",
                        help="dry run on CPU: scaled-down shapes, 64-token samples")
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu-check-out")
    parser.add_argument("--budget", type=float, default=480.0,
                        help="seconds for everything (default 480: one call of about 8 "
                             "minutes, inside the 10-minute limit of one command)")
    parser.add_argument("--runs", type=int, default=len(MEMORY_RUNS),
                        help=f"the first N of the {len(MEMORY_RUNS)} memory runs")
    parser.add_argument("--stages", default=",".join(STAGES),
                        help=f"comma-separated subset of {','.join(STAGES)}")
    args = parser.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = set(stages) - set(STAGES)
    if unknown:
        parser.error(f"unknown stages: {', '.join(sorted(unknown))}")
    check = Check(Path(args.out), args.budget, args.tiny)
    check.runs = args.runs
    if "env" not in stages:
        stages.insert(0, "env")  # every other stage needs the models it builds
    for name in STAGES:
        if name not in stages:
            continue
        if name != "env" and "models" not in check.results:
            check.stage(name, {"ok": False, "skipped": "no models (stage env failed)"})
            continue
        try:
            globals()[f"stage_{name}"](check)
        except Exception as exc:  # noqa: BLE001 - one broken stage must not lose the others
            check.stage(name, {"ok": False, "error": f"{type(exc).__name__}: {exc}"})
    check.results["memory_table"] = summary_table(check.results["memory"])
    check.save()
    print(check.results["memory_table"])
    failed = [n for n, r in check.results["stages"].items()
              if not r.get("ok") and not r.get("skipped")]
    print(f"results: {check.out / 'gpu-check.json'}; failed: {', '.join(failed) or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
