"""`peftkit ls`: the table of shipped recipes."""

from __future__ import annotations

from rich.table import Table

from peftkit.adapters.registry import describe
from peftkit.cli.common import add_command, make_console
from peftkit.recipe import registry

HELP = "list the shipped recipes"
EXAMPLES = """\
examples:
  peftkit ls"""


def add_parser(subparsers) -> None:
    add_command(subparsers, "ls", cmd_ls, HELP, EXAMPLES)


def cmd_ls(args) -> int:
    table = Table(title="peftkit recipes", title_justify="left")
    for col in ("name", "base model", "method", "quant", "hardware", "description"):
        table.add_column(col, overflow="fold")
    for name, entry in sorted(registry.shipped().items()):
        r = entry.recipe
        method = ("Q" if r.model.quantize else "") + describe(r.adapter)
        table.add_row(name, r.model.name, method, r.model.quantize or "-",
                      r.launch.hardware, entry.description)
    make_console().print(table)
    return 0
