"""`peftkit eval`: score a run's adapter (or its base) on held-out data."""

from __future__ import annotations

from pathlib import Path

from peftkit.cli.common import RUN_HELP, add_command, make_console
from peftkit.inference.evaluate import run_eval

HELP = "score a run's adapter (or its base) on held-out data"
EXAMPLES = """\
examples:
  peftkit eval runs/demo                   # the run's own held-out data
  peftkit eval runs/demo --base            # the base alone, for before/after
  peftkit eval runs/demo --data test.jsonl --metrics loss,perplexity --limit 50"""


def add_parser(subparsers) -> None:
    p = add_command(subparsers, "eval", cmd_eval, HELP, EXAMPLES)
    p.add_argument("run", help=RUN_HELP)
    p.add_argument("--data", default="", metavar="PATH",
                   help="eval data file in any supported format (default: the run's own "
                        "held-out data)")
    p.add_argument("--metrics", default="loss,perplexity,exact_match", metavar="LIST",
                   help="comma-separated: loss, perplexity, and metric modules shipped in "
                        "peftkit/assets/metrics (exact_match); default %(default)s")
    p.add_argument("--base", action="store_true",
                   help="evaluate the base model alone (adapter disabled), for before/after")
    p.add_argument("--limit", type=int, default=0, metavar="N",
                   help="use only the first N samples (0 = all)")
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=0,
                   metavar="N", help="answer budget for generated metrics (default: the "
                                     "recipe's train.max_new_tokens)")


def cmd_eval(args) -> int:
    entry = run_eval(args.run, args.data, args.metrics, args.base, args.limit,
                     args.max_new_tokens)
    console = make_console()
    console.print(f"{'base model' if args.base else 'adapter'} on {entry['data']} "
                  f"({entry['samples']} samples, {entry['prompts']} prompts):")
    for key, value in entry["metrics"].items():
        shown = f"{100 * value:.1f}%" if key == "exact_match" else f"{value:.4f}"
        console.print(f"  {key}: [bold]{shown}[/]")
    for row in entry["answers"]:
        mark = "[green]ok[/]" if row["answer"] == row["reference"] else "[red]x[/]"
        console.print(f"  {mark} {row['prompt']!r} -> {row['answer']!r} "
                      f"(expected {row['reference']!r})")
    console.print(f"written: {Path(args.run) / 'eval.json'}, metrics.jsonl, README.md")
    return 0
