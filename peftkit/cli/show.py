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
    from peftkit.model.summary import parameter_counts

    counts = parameter_counts(recipe)
    if counts is None:
        console.print("parameters: unknown (base config unavailable offline)")
    else:
        trainable, total, source = counts
        console.print(f"parameters: {trainable:,} trainable of {total:,} "
                      f"({100 * trainable / total:.3f}%) with {describe(recipe.adapter)}, "
                      f"shape from {source}")
    print_memory_estimate(recipe, console)
    if args.data:
        print_report(preflight(recipe), console)
    return 0


def print_memory_estimate(recipe, console) -> None:
    """The memory estimate for the device this machine would train on and, without a GPU
    here, for a bf16-capable GPU (what the real recipes are sized for)."""
    # these import torch (seconds): kept out of CLI start-up, as above
    import torch

    from peftkit.model.loading import resolve_precision
    from peftkit.model.memory import device_total, estimate, human
    from peftkit.model.summary import base_config

    config, _ = base_config(recipe)
    if config is None:
        console.print("memory estimate: unknown (base config unavailable offline)")
        return
    here = "cuda" if torch.cuda.is_available() else "cpu"
    targets = {here: estimate(recipe, config, resolve_precision(recipe.model, recipe.launch,
                                                                here), here)}
    if here == "cpu":
        targets["bf16 GPU"] = estimate(recipe, config, resolve_precision(
            recipe.model, recipe.launch, "cuda", bf16_ok=True), "cuda")
    first, gpu = next(iter(targets.values())), list(targets.values())[-1]
    table = Table(title=f"memory estimate per process (peak of a training step; "
                        f"{first.assumptions[0]})", title_justify="left", box=None,
                  padding=(0, 2))
    table.add_column("part")
    for name in targets:
        table.add_column(name, justify="right")
    table.add_column(f"how it is counted ({list(targets)[-1]})", overflow="fold")
    for part in first.parts:
        table.add_row(part, *[human(e.parts[part]) for e in targets.values()],
                      f"[dim]{gpu.notes[part]}[/]")
    table.add_row("[bold]total[/]", *[f"[bold]{human(e.total)}[/]" for e in targets.values()],
                  "[dim]+ CUDA context (~0.5-1 GiB) on a GPU; see peftkit/model/memory.py[/]")
    console.print(table)
    console.print("  " + "; ".join(f"{name}: {e.precision}" for name, e in targets.items()))
    if gpu.offloaded:
        console.print(f"  train.offload_activations: {human(gpu.offloaded)} of activations "
                      "wait in pinned CPU memory (GPU only)")
    available, what = device_total(here)
    if available:
        share = first.total / available
        colour = "green" if share < 0.9 else "red"
        console.print(f"{here}: [{colour}]{human(first.total)} of {human(available)} {what} "
                      f"({100 * share:.0f}%)[/]")
