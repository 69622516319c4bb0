"""`peftkit show`: a resolved recipe, its validation, parameter counts and memory estimate;
with --data, a report on its training data."""

from __future__ import annotations

import dataclasses

from rich.table import Table

from peftkit.adapters.registry import describe
from peftkit.cli.common import add_command, add_recipe_args, make_console, resolve_recipe
from peftkit.recipe.schema import SECTIONS

HELP = "print a resolved recipe and its parameter counts"
EXAMPLES = """\
examples:
  peftkit show demo
  peftkit show llama3-8b-lora adapter.r=32 train.lr=1e-4
  peftkit show my_recipe.py
  peftkit show demo --data                 # data report: lengths, loss share, samples
  peftkit show demo adapter.method=ia3     # trainable parameters of IA3"""


def add_parser(subparsers) -> None:
    p = add_command(subparsers, "show", cmd_show, HELP, EXAMPLES)
    add_recipe_args(p)
    p.add_argument("--data", action="store_true",
                   help="also build the training data and report on it: counts, token "
                        "lengths, loss share, truncation, EOS, two samples with trained spans")


def cmd_show(args) -> int:
    entry, recipe = resolve_recipe(args)
    console = make_console()
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
    # these import torch (seconds): kept out of CLI start-up, and after bad input is reported
    from peftkit.data.preflight import preflight, print_report
    from peftkit.model.memory import print_estimate
    from peftkit.model.summary import parameter_counts

    counts = parameter_counts(recipe)
    if counts is None:
        console.print("parameters: unknown (base config unavailable offline)")
    else:
        trainable, total, source = counts
        console.print(f"parameters: {trainable:,} trainable of {total:,} "
                      f"({100 * trainable / total:.3f}%) with {describe(recipe.adapter)}, "
                      f"shape from {source}")
    print_estimate(recipe, console)
    if args.data:
        print_report(preflight(recipe), console)
    return 0
