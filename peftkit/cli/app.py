"""The `peftkit` command line. Each command is a small function; errors become exit codes.

Exit codes: 0 success, 2 bad input (one line, no traceback; --debug shows it), 1 anything
else (a run that cannot go on, e.g. diverged or disk full: one line too), 130 / 143 when
SIGINT / SIGTERM stopped training after writing a checkpoint (README, "Reliability").
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import os
import shutil
import sys
import traceback
from pathlib import Path

from rich.console import Console
from rich.table import Table

from peftkit import __version__
from peftkit.errors import RunError, UserError

EXAMPLES = {
    "ls": "examples:\n  peftkit ls",
    "show": "examples:\n  peftkit show demo\n  peftkit show llama3-8b-lora adapter.r=32 "
            "train.lr=1e-4\n  peftkit show my_recipe.py\n"
            "  peftkit show demo --data                 # data report: lengths, loss share, "
            "samples\n  peftkit show demo adapter.method=ia3     # trainable parameters of IA3",
    "cp": "examples:\n  peftkit cp demo my_recipe.py   # then edit it and:\n"
          "  peftkit train my_recipe.py",
    "train": "examples:\n  peftkit train demo\n  peftkit train demo train.max_steps=50 "
             "adapter.r=8\n  peftkit train qwen2.5-7b-lora model.tiny=true "
             "data.train=my.jsonl\n  peftkit train demo --resume\n"
             "  peftkit train demo --nproc 2            # 2 processes via accelerate launch\n"
             "  accelerate launch -m peftkit train demo\n"
             "  peftkit train demo --report-to tensorboard   # logs to runs/demo/tb/\n"
             "  peftkit train demo adapter.use_dora=true adapter.loraplus_lr_ratio=16",
    "bench": "examples:\n  peftkit bench demo --steps 4\n"
             "  peftkit bench demo --vs hf            # side by side with Trainer + peft\n"
             "  peftkit bench benchmarks/recipes/small.py --vs hf,hf-grouped --out r.json",
    "eval": "examples:\n  peftkit eval runs/demo                   # the run's own held-out data\n"
            "  peftkit eval runs/demo --base            # the base alone, for before/after\n"
            "  peftkit eval runs/demo --data test.jsonl --metrics loss,perplexity --limit 50",
    "generate": "examples:\n  peftkit generate runs/demo \"Sort: 3 1 2\" \"Reverse: a b c\"\n"
                "  peftkit generate runs/demo \"Sort: 9 4 7\" --temperature 0.7 --top-p 0.9 "
                "--seed 1\n  peftkit generate runs/my-run \"Once upon a time\" --raw "
                "--max-new-tokens 64",
    "chat": "examples:\n  peftkit chat runs/demo                   # /reset starts over, /exit "
            "quits\n  printf 'Sort: 3 1 2\\n/exit\\n' | peftkit chat runs/demo",
    "doctor": "examples:\n  peftkit doctor                           # paste the output into a "
              "bug report",
    "merge": "examples:\n  peftkit merge runs/demo --out merged/demo\n"
             "  peftkit merge runs/llama3-8b-qlora --out merged/llama --dtype bf16   # 4-bit "
             "base: merged into a bf16 copy\n"
             "  python -c \"from transformers import AutoModelForCausalLM as M; "
             "M.from_pretrained('merged/demo')\"",
    "push": "examples:\n  peftkit push runs/demo --repo-id me/demo-lora --dry-run   # writes "
            "runs/demo/push/ only\n  HF_TOKEN=hf_... peftkit push runs/demo --repo-id "
            "me/demo-lora --private\n  peftkit push runs/demo --repo-id me/demo-merged "
            "--merged merged/demo --revision v1\n"
            "  peftkit train demo hub.repo_id=me/demo-lora hub.push_at_end=true",
}


def _console() -> Console:
    console = Console(highlight=False)
    if not console.is_terminal:  # pipes and CI logs: wide enough not to fold every cell
        console = Console(highlight=False, width=140)
    return console


def _quiet_libraries() -> None:
    """Silence library chatter that is not actionable for peftkit users."""
    import logging
    import warnings

    # bitsandbytes logs a warning on import on CPUs with AVX512-BF16 when the optional
    # `kernels` package is absent; its slower built-in path is used instead.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # bitsandbytes' 8-bit layers log "inputs will be cast ... to float16" on every eval-mode
    # forward with float32 inputs (CPU): expected, and thousands of lines per evaluation.
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    # peft calls a transformers method deprecated in v5 (is_gradient_checkpointing).
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    # datasets logs an unreadable parquet file as an ERROR before raising; peftkit reports
    # the raised error itself, on one line (data.py), so the log line is a duplicate.
    logging.getLogger("datasets.packaged_modules.parquet.parquet").setLevel(logging.CRITICAL)
    # Prompt tuning: generate passes position ids, which peft ignores (correctly: the
    # virtual tokens shift every position).
    warnings.filterwarnings("ignore", message="Position ids are not supported for parameter")
    # PiSSA/OLoRA checkpoints keep the unconverted adapter on purpose (resume needs it); the
    # final adapter is converted to a plain LoRA (adapters/lora.py), as peft advises.
    warnings.filterwarnings("ignore", message="(PiSSA|OLoRA) changes the base weights")


def cmd_ls(args) -> int:
    from peftkit.adapters.registry import describe
    from peftkit.recipe import registry

    table = Table(title="peftkit recipes", title_justify="left")
    for col in ("name", "base model", "method", "quant", "hardware", "description"):
        table.add_column(col, overflow="fold")
    for name, entry in sorted(registry.shipped().items()):
        r = entry.recipe
        method = ("Q" if r.model.quantize else "") + describe(r.adapter)
        table.add_row(name, r.model.name, method, r.model.quantize or "-",
                      r.launch.hardware, entry.description)
    _console().print(table)
    return 0


def _resolve(args):
    from peftkit.recipe import registry
    from peftkit.recipe.overrides import apply_overrides

    entry = registry.resolve(args.recipe)
    return entry, apply_overrides(entry.recipe, args.overrides)


def cmd_show(args) -> int:
    from peftkit.recipe.schema import SECTIONS
    from peftkit.adapters.registry import describe
    from peftkit.model.summary import parameter_counts

    entry, recipe = _resolve(args)
    console = _console()
    console.print(f"[bold]{recipe.name}[/] — {entry.description}\n  from {entry.path}")
    for section in SECTIONS:
        table = Table(title=section, title_justify="left", show_header=False, box=None,
                      padding=(0, 2))
        original = getattr(entry.recipe, section)
        for f in dataclasses.fields(getattr(recipe, section)):
            value = getattr(getattr(recipe, section), f.name)
            changed = value != getattr(original, f.name)
            table.add_row(f"{section}.{f.name}", f"[cyan]{value!r}[/]" + (
                "  [yellow](override)[/]" if changed else ""), f"[dim]{f.metadata['doc']}[/]")
        console.print(table)
    console.print("validation: [green]ok[/]")
    counts = parameter_counts(recipe)
    if counts is None:
        console.print("parameters: unknown (base config unavailable offline)")
    else:
        trainable, total, source = counts
        console.print(f"parameters: {trainable:,} trainable of {total:,} "
                      f"({100 * trainable / total:.3f}%) with {describe(recipe.adapter)}, "
                      f"shape from {source}")
    from peftkit.model.memory import print_estimate

    print_estimate(recipe, console)
    if args.data:
        from peftkit.data.preflight import preflight, print_report

        print_report(preflight(recipe), console)
    return 0


def cmd_cp(args) -> int:
    from peftkit.recipe import registry

    entry = registry.resolve(args.recipe)
    dest = Path(args.dest)
    if dest.suffix != ".py":
        raise UserError(f"{dest}: the copy must be a .py file (e.g. my_recipe.py)")
    if dest.exists() and not args.force:
        raise UserError(f"{dest} already exists; choose another name or pass --force")
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(entry.path, dest)
    _console().print(f"copied {entry.name} to {dest}; edit it, then: peftkit train {dest}")
    return 0


def cmd_train(args) -> int:
    from peftkit.training import distributed
    from peftkit.training import launcher
    from peftkit.run import rundir

    if args.report_to:  # the same as the override, so workers of --nproc get it too
        args.overrides = [*args.overrides, f"train.report_to={args.report_to}"]
    entry, recipe = _resolve(args)
    if args.nproc < 0 or args.num_machines < 1:
        raise UserError("--nproc and --num_machines must be positive")
    nproc = args.nproc or recipe.launch.num_processes
    strategy = distributed.check(recipe)  # its refusals come before N workers start
    sharded = strategy != "ddp"
    if (nproc * args.num_machines > 1 or sharded) and not launcher.in_distributed_worker():
        import torch

        cuda = torch.cuda.is_available()
        if sharded and not cuda and nproc * args.num_machines < 2:
            raise UserError(f"launch.strategy={strategy} shards the training state across "
                            "processes: on CPU run it with --nproc 2 or more, or use "
                            "launch.strategy=ddp")
        if not args.resume:  # fail now, not in N workers after 10 s of imports each
            rundir.check_target(rundir.run_dir(recipe), args.overwrite)
        topology = launcher.Topology(nproc, args.num_machines, args.machine_rank,
                                     args.main_process_ip, args.main_process_port,
                                     args.accelerate_config, strategy, recipe.launch.zero_stage)
        return launcher.run(topology, _worker_args(args), cuda=cuda)

    from peftkit.training.loop import train

    result = train(recipe, str(entry.path), overwrite=args.overwrite, resume=args.resume)
    if result.path.exists():
        _print_summary(result)
    return 0


def cmd_bench(args) -> int:
    from peftkit.bench import harness as bench
    from peftkit.bench import report as bench_report

    entry, recipe = _resolve(args)
    vs = [v.strip() for v in (args.vs or "").split(",") if v.strip()]
    out = Path(args.out or f"runs/bench/{recipe.name or 'bench'}.json")
    result = bench.bench(recipe, str(entry.path), vs, args.steps, str(out), args.inline,
                         args.threads)
    bench_report.plot(result, out.with_suffix(".png"))
    console = _console()
    console.print(bench_report.table(result))
    for line in bench_report.footer(result):
        console.print(line)
    console.print(f"results: {out} and {out.with_suffix('.png')}")
    if not result["equal_work"]["ok"]:
        raise bench.UnequalWork("comparison refused, the sides did not do the same work: "
                                + "; ".join(result["equal_work"]["problems"]))
    return 0


def _sampling(args):
    from peftkit.inference.generate import Sampling

    return Sampling(args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.seed)


def cmd_eval(args) -> int:
    from peftkit.inference.evaluate import run_eval

    entry = run_eval(args.run, args.data, args.metrics, args.base, args.limit,
                     args.max_new_tokens)
    console = _console()
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


def cmd_generate(args) -> int:
    from peftkit.inference.generate import generate

    generate(args.run, args.prompts, _sampling(args), system=args.system, raw=args.raw)
    return 0


def cmd_chat(args) -> int:
    from peftkit.inference.generate import chat

    return chat(args.run, _sampling(args), system=args.system)


def cmd_doctor(args) -> int:
    from peftkit.cli.doctor import report

    print(report())
    return 0


def cmd_merge(args) -> int:
    from rich.markup import escape

    from peftkit.export.merge import merge_run

    console = _console()
    merge_run(args.run, args.out, args.dtype, overwrite=args.overwrite,
              say=lambda line: console.print(escape(line)))
    console.print(f"merged model: {args.out}  (AutoModelForCausalLM.from_pretrained loads it; "
                  "figures in merge_report.json)")
    return 0


def cmd_push(args) -> int:
    from rich.markup import escape

    from peftkit.run.hub import push

    console = _console()
    push(args.run, args.repo_id, args.private, args.merged, args.revision, args.dry_run,
         say=lambda line: console.print(escape(line)))
    return 0


def _worker_args(args) -> list[str]:
    """The `peftkit train` arguments each worker gets (launch flags stripped)."""
    argv = [args.recipe, *args.overrides]
    if args.overwrite:
        argv.append("--overwrite")
    if args.resume:
        argv += ["--resume"] + ([args.resume] if isinstance(args.resume, str) else [])
    return argv


def _print_summary(result) -> None:
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return
    console = _console()
    before, after = result.evals.get("before", {}), result.evals.get("after", {})
    if "eval_loss" in after:
        was = f"{before['eval_loss']:.4f} -> " if "eval_loss" in before else ""
        console.print(f"held-out loss: {was}{after['eval_loss']:.4f}")
    if "exact_match" in after:
        was = f"{100 * before['exact_match']:.1f}% -> " if "exact_match" in before else ""
        console.print(f"held-out exact match: {was}[bold]{100 * after['exact_match']:.1f}%[/]")
        for prompt, answer, ref in after.get("samples", []):
            mark = "[green]ok[/]" if answer == ref else "[red]x[/]"
            console.print(f"  {mark} {prompt!r} -> {answer!r} (expected {ref!r})")
    console.print(f"run directory: {result.path}  (adapter: {result.path / 'adapter'})")


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line like every other peftkit error (its subcommand
    parsers are of the same class)."""

    def error(self, message: str):
        self.exit(2, f"error: {message}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="peftkit", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Parameter-efficient fine-tuning of LLMs by recipe.",
        epilog="examples:\n  peftkit ls\n  peftkit show demo\n  peftkit train demo\n"
               "  peftkit cp demo mine.py && peftkit train mine.py train.lr=5e-4")
    parser.add_argument("--version", action="version", version=f"peftkit {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, func, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_, epilog=EXAMPLES.get(name),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show tracebacks of errors")
        p.set_defaults(func=func)
        return p

    def recipe_args(p):
        p.add_argument("recipe", help="recipe name (see `peftkit ls`) or path to a .py recipe")
        p.add_argument("overrides", nargs="*", metavar="section.field=value",
                       help="override recipe settings, e.g. train.lr=1e-4 adapter.r=32")

    command("ls", cmd_ls, "list the shipped recipes")
    p = command("show", cmd_show, "print a resolved recipe and its parameter counts")
    recipe_args(p)
    p.add_argument("--data", action="store_true",
                   help="also build the training data and report on it: counts, token "
                        "lengths, loss share, truncation, EOS, two samples with trained spans")
    p = command("cp", cmd_cp, "copy a recipe to a file you can edit")
    p.add_argument("recipe", help="recipe name or path")
    p.add_argument("dest", help="destination .py file")
    p.add_argument("--force", action="store_true", help="replace DEST if it exists")
    p = command("train", cmd_train, "train a recipe's adapter; writes runs/<name>/")
    recipe_args(p)
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing run directory of the same name")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                   help="continue from the newest complete checkpoint (or the one given)")
    p.add_argument("--report-to", dest="report_to", default=None,
                   choices=("none", "tensorboard", "wandb", "mlflow"),
                   help="experiment tracker (= train.report_to=...); tensorboard writes to "
                        "runs/<name>/tb/")
    launch = p.add_argument_group(
        "multi-process", "start N workers through `accelerate launch` (the command is printed); "
        "inside `accelerate launch`/torchrun these are ignored")
    launch.add_argument("--nproc", type=int, default=0, metavar="N",
                        help="processes per machine (default: the recipe's launch.num_processes)")
    launch.add_argument("--num_machines", type=int, default=1, metavar="M")
    launch.add_argument("--machine_rank", type=int, default=0, metavar="R")
    launch.add_argument("--main_process_ip", default=None, metavar="IP")
    launch.add_argument("--main_process_port", type=int, default=None, metavar="PORT")
    launch.add_argument("--accelerate-config", dest="accelerate_config", default=None,
                        metavar="FILE", help="an accelerate config file (accelerate config)")
    p = command("bench", cmd_bench, "measure tokens/s, peak memory and MFU, side by side "
                "with plain transformers Trainer + peft")
    recipe_args(p)
    p.add_argument("--vs", default="", metavar="hf|hf-grouped",
                   help="baseline(s) to run on the same work, comma-separated: hf (Trainer "
                        "defaults, padding) or hf-grouped (Trainer with length grouping)")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps (samples = steps x "
                   "batch_size x grad_accum, the first rows of data.train); default 8")
    p.add_argument("--out", default=None, metavar="FILE.json",
                   help="results JSON (default runs/bench/NAME.json); a plot goes next to it")
    p.add_argument("--threads", type=int, default=0, metavar="N",
                   help="CPU threads for every side (default: torch's default)")
    p.add_argument("--inline", action="store_true",
                   help="run the sides in this process, not one fresh process each (faster; "
                        "peak memory of later sides is then less reliable)")
    _inference_commands(command)
    _publish_commands(command)
    return parser


def _publish_commands(command) -> None:
    """merge and push (on a run directory)."""
    run_help = "run directory written by `peftkit train` (e.g. runs/demo)"
    p = command("merge", cmd_merge, "merge a run's adapter into its base (a 4/8-bit base is "
                "merged unquantized), verify it, save a plain transformers model")
    p.add_argument("run", help=run_help)
    p.add_argument("--out", required=True, metavar="DIR", help="directory for the merged model")
    p.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp16", "fp32"),
                   help="dtype of the merged weights (default: the base checkpoint's)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace DIR when it holds a previous merge")
    p = command("push", cmd_push, "publish a run's adapter (or a merged model) to the "
                "Hugging Face Hub with a model card")
    p.add_argument("run", help=run_help)
    p.add_argument("--repo-id", dest="repo_id", default="", metavar="OWNER/NAME",
                   help="Hub repository, created if missing (default: the recipe's hub.repo_id)")
    p.add_argument("--private", action="store_true", default=None,
                   help="create the repository private (default: hub.private)")
    p.add_argument("--merged", default=None, metavar="DIR",
                   help="publish this `peftkit merge` output instead of the adapter")
    p.add_argument("--revision", default=None, metavar="BRANCH",
                   help="branch to push to, created if missing (default: hub.revision or main)")
    p.add_argument("--dry-run", dest="dry_run", action="store_true",
                   help="only write the folder that would be uploaded (RUN/push/) and list "
                        "it; needs no token and no network")


def _sampling_args(p) -> None:
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=256,
                   metavar="N", help="token budget per answer (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T",
                   help="sampling temperature; 0 (default) = greedy, deterministic")
    p.add_argument("--top-p", dest="top_p", type=float, default=1.0, metavar="P",
                   help="nucleus sampling: keep the smallest token set with probability P")
    p.add_argument("--top-k", dest="top_k", type=int, default=0, metavar="K",
                   help="sample among the K most likely tokens (0 = no limit)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling")
    p.add_argument("--system", default=None, metavar="TEXT",
                   help="system message (default: the recipe's data.system_prompt)")


def _inference_commands(command) -> None:
    """eval, generate, chat (on a run directory) and doctor."""
    run_help = "run directory written by `peftkit train` (e.g. runs/demo)"
    p = command("eval", cmd_eval, "score a run's adapter (or its base) on held-out data")
    p.add_argument("run", help=run_help)
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
    p = command("generate", cmd_generate, "answer prompts with a run's adapter (streamed)")
    p.add_argument("run", help=run_help)
    p.add_argument("prompts", nargs="+", metavar="PROMPT", help="one or more prompts")
    _sampling_args(p)
    p.add_argument("--raw", action="store_true", default=None,
                   help="feed the prompt as raw text, without the chat template (the default "
                        "for runs trained on prompt_completion or text data)")
    p = command("chat", cmd_chat, "talk to a run's adapter: each stdin line is a user turn")
    p.add_argument("run", help=run_help)
    _sampling_args(p)
    command("doctor", cmd_doctor, "versions, devices, bitsandbytes, Hub access, accelerate "
            "config: a report to paste into a bug report")


def main(argv: list[str] | None = None) -> int:
    from peftkit.training.launcher import report_status

    code = _main(argv)
    report_status(code)
    return code


def _main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        # Overrides may follow options (`train demo --nproc 2 train.lr=1e-4`), which plain
        # argparse will not collect into the positional list.
        stray = [a for a in extra if a.startswith("-") or "=" not in a
                 or not hasattr(args, "overrides")]
        if stray:
            parser.error(f"unrecognized arguments: {' '.join(stray)}")
        _override_after_resume(args)
        if extra:
            args.overrides = [*args.overrides, *extra]
    except SystemExit as exc:  # argparse: 2 on bad arguments, 0 on --help
        return int(exc.code or 0)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    _quiet_libraries()
    try:
        return args.func(args)
    except (UserError, RunError) as exc:  # one line, no traceback (see errors.py)
        if args.debug:
            traceback.print_exc()
        if os.environ.get("RANK", "0") == "0":  # workers all fail alike: say it once
            print(_one_line_report(exc, args), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the last line of defence: exit 1, say what
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC and not args.debug:
            print(f"error: no space left on device ({exc.filename or exc}); free disk space, "
                  "then continue from the newest complete checkpoint with --resume",
                  file=sys.stderr)
            return 1
        traceback.print_exc()
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


def _override_after_resume(args) -> None:
    """`train demo --resume train.lr=1e-4`: --resume takes an optional CHECKPOINT, so
    argparse hands it the override; give it back (a real path containing '=' stays)."""
    value = getattr(args, "resume", None)
    if isinstance(value, str) and "=" in value and not Path(value).exists():
        args.overrides, args.resume = [*args.overrides, value], True


def _one_line_report(exc: Exception, args) -> str:
    """`error: ...` (or `stopped by SIGTERM ...`), plus the command that continues a run
    that ended on a complete checkpoint."""
    from peftkit.training.signals import Interrupted

    line = " ".join(str(exc).split())
    if getattr(exc, "resumable", False) and getattr(args, "command", None) == "train":
        line += f". Resume with: {_resume_command(args)}"
    return line if isinstance(exc, Interrupted) else f"error: {line}"


def _resume_command(args) -> str:
    """The `peftkit train` command that continues this run from its newest checkpoint."""
    import shlex

    argv = ["peftkit", "train", args.recipe, *args.overrides, "--resume"]
    if getattr(args, "nproc", 0):
        argv += ["--nproc", str(args.nproc)]
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:  # a worker of `--nproc N`
        argv += ["--nproc", os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])]
    return shlex.join(argv)


if __name__ == "__main__":
    raise SystemExit(main())
