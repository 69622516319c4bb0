"""`peftkit merge`: fold a run's adapter into its base and save a plain transformers model."""

from __future__ import annotations

from rich.markup import escape

from peftkit.cli.common import RUN_HELP, add_command, make_console

HELP = ("merge a run's adapter into its base (a 4/8-bit base is merged unquantized), verify "
        "it, save a plain transformers model")
EXAMPLES = """\
examples:
  peftkit merge runs/demo --out merged/demo
  peftkit merge runs/llama3-8b-qlora --out merged/llama --dtype bf16   # 4-bit base: merged into a bf16 copy
  python -c "from transformers import AutoModelForCausalLM as M; M.from_pretrained('merged/demo')\""""


def add_parser(subparsers) -> None:
    p = add_command(subparsers, "merge", cmd_merge, HELP, EXAMPLES)
    p.add_argument("run", help=RUN_HELP)
    p.add_argument("--out", required=True, metavar="DIR", help="directory for the merged model")
    p.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp16", "fp32"),
                   help="dtype of the merged weights (default: the base checkpoint's)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace DIR when it holds a previous merge")


def cmd_merge(args) -> int:
    # imports torch (seconds): kept out of CLI start-up
    from peftkit.export.merge import merge_run

    console = make_console()
    merge_run(args.run, args.out, args.dtype, overwrite=args.overwrite,
              say=lambda line: console.print(escape(line)))
    console.print(f"merged model: {args.out}  (AutoModelForCausalLM.from_pretrained loads it; "
                  "figures in merge_report.json)")
    return 0
