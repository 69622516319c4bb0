"""`peftkit bench`: tokens/s, peak memory and MFU of a recipe, side by side with plain
transformers Trainer + peft on the same work."""

from __future__ import annotations

from pathlib import Path

from peftkit.bench import report as bench_report
from peftkit.cli.common import add_command, add_recipe_args, make_console, resolve_recipe

HELP = ("measure tokens/s, peak memory and MFU, side by side with plain transformers "
        "Trainer + peft and TRL's SFTTrainer (DPOTrainer for DPO recipes)")
EXAMPLES = """\
examples:
  peftkit bench tiny-demo --steps 4
  peftkit bench tiny-demo --vs hf            # side by side with Trainer + peft
  peftkit bench tiny-demo --vs trl           # TRL SFTTrainer, packed (pip install 'peftkit[bench]')
  peftkit bench demo-dpo --vs trl            # DPO: TRL DPOTrainer, reference precomputed
  peftkit bench benchmarks/recipes/small.py --vs hf,hf-grouped,trl --repeat 3 --out r.json"""


def add_parser(subparsers) -> None:
    p = add_command(subparsers, "bench", cmd_bench, HELP, EXAMPLES)
    add_recipe_args(p)
    p.add_argument("--vs", default="", metavar="hf|hf-grouped|trl",
                   help="baseline(s) to run on the same work, comma-separated: hf (Trainer "
                        "defaults, padding), hf-grouped (Trainer with length grouping) or trl "
                        "(TRL SFTTrainer, packed bfd / padding-free; DPOTrainer for a DPO recipe; "
                        "needs peftkit[bench])")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps (samples = steps x "
                   "batch_size x grad_accum, the first rows of data.train); default 8")
    p.add_argument("--out", default=None, metavar="FILE.json",
                   help="results JSON (default runs/bench/NAME.json); a plot goes next to it")
    p.add_argument("--repeat", type=int, default=1, metavar="N",
                   help="run every side N times, alternating; ratios then come as median "
                        "(min-max) over the N runs (default 1)")
    p.add_argument("--threads", type=int, default=0, metavar="N",
                   help="CPU threads for every side (default: torch's default)")
    p.add_argument("--inline", action="store_true",
                   help="run the sides in this process, not one fresh process each (faster; "
                        "peak memory of later sides is then less reliable)")


def cmd_bench(args) -> int:
    # imports torch (seconds): kept out of CLI start-up
    from peftkit.bench import harness
    from peftkit.bench.same_work import UnequalWork

    entry, recipe = resolve_recipe(args)
    vs = [v.strip() for v in (args.vs or "").split(",") if v.strip()]
    out = Path(args.out or f"runs/bench/{recipe.name or 'bench'}.json")
    result = harness.bench(recipe, str(entry.path), vs, args.steps, str(out), args.inline,
                           args.threads, args.repeat)
    bench_report.plot(result, out.with_suffix(".png"))
    console = make_console()
    console.print(bench_report.table(result))
    for line in bench_report.footer(result):
        console.print(line)
    console.print(f"results: {out} and {out.with_suffix('.png')}")
    if not result["equal_work"]["ok"]:
        raise UnequalWork("comparison refused, the sides did not do the same work: "
                          + "; ".join(result["equal_work"]["problems"]))
    return 0
