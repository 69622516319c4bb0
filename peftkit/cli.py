"""The `peftkit` command line. Each command is a small function; errors become exit codes.

Exit codes: 0 success, 2 bad input (one line, no traceback; --debug shows it), 1 anything else.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import traceback
from pathlib import Path

from rich.console import Console
from rich.table import Table

from peftkit import __version__
from peftkit.errors import UserError

EXAMPLES = {
    "ls": "examples:\n  peftkit ls",
    "show": "examples:\n  peftkit show demo\n  peftkit show llama3-8b-lora adapter.r=32 "
            "train.lr=1e-4\n  peftkit show my_recipe.py",
    "cp": "examples:\n  peftkit cp demo my_recipe.py   # then edit it and:\n"
          "  peftkit train my_recipe.py",
    "train": "examples:\n  peftkit train demo\n  peftkit train demo train.max_steps=50 "
             "adapter.r=8\n  peftkit train qwen2.5-7b-lora model.tiny=true "
             "data.train=my.jsonl\n  peftkit train demo --resume\n"
             "  peftkit train demo --nproc 2            # 2 processes via accelerate launch\n"
             "  accelerate launch -m peftkit train demo",
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
    # peft calls a transformers method deprecated in v5 (is_gradient_checkpointing).
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")


def cmd_ls(args) -> int:
    from peftkit import registry

    table = Table(title="peftkit recipes", title_justify="left")
    for col in ("name", "base model", "method", "quant", "hardware", "description"):
        table.add_column(col, overflow="fold")
    for name, entry in sorted(registry.shipped().items()):
        r = entry.recipe
        method = "DoRA" if r.adapter.use_dora else "LoRA"
        if r.model.quantize:
            method = "Q" + method
        table.add_row(name, r.model.name, f"{method} r{r.adapter.r}", r.model.quantize or "-",
                      r.launch.hardware, entry.description)
    _console().print(table)
    return 0


def _resolve(args):
    from peftkit import registry
    from peftkit.config import apply_overrides

    entry = registry.resolve(args.recipe)
    return entry, apply_overrides(entry.recipe, args.overrides)


def cmd_show(args) -> int:
    from peftkit.config import SECTIONS
    from peftkit.summary import parameter_counts

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
                      f"({100 * trainable / total:.3f}%), shape from {source}")
    return 0


def cmd_cp(args) -> int:
    from peftkit import registry

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
    from peftkit import launcher, rundir

    entry, recipe = _resolve(args)
    if args.nproc < 0 or args.num_machines < 1:
        raise UserError("--nproc and --num_machines must be positive")
    nproc = args.nproc or recipe.launch.num_processes
    if nproc * args.num_machines > 1 and not launcher.in_distributed_worker():
        if not args.resume:  # fail now, not in N workers after 10 s of imports each
            rundir.check_target(rundir.run_dir(recipe), args.overwrite)
        import torch

        topology = launcher.Topology(nproc, args.num_machines, args.machine_rank,
                                     args.main_process_ip, args.main_process_port,
                                     args.accelerate_config)
        return launcher.run(topology, _worker_args(args), cuda=torch.cuda.is_available())

    from peftkit.train import train

    result = train(recipe, str(entry.path), overwrite=args.overwrite, resume=args.resume)
    if result.path.exists():
        _print_summary(result)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    recipe_args(command("show", cmd_show, "print a resolved recipe and its parameter counts"))
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
    return parser


def main(argv: list[str] | None = None) -> int:
    from peftkit.launcher import report_status

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
    except UserError as exc:
        if args.debug:
            traceback.print_exc()
        if os.environ.get("RANK", "0") == "0":  # workers all fail alike: say it once
            print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the last line of defence: exit 1, say what
        from peftkit.train import TrainingDiverged

        if args.debug or not isinstance(exc, TrainingDiverged):
            traceback.print_exc()
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
