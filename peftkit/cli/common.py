"""What every `peftkit` command shares: the console, the argparse class whose errors are one
line, how a command's subparser is added, and the recipe and run-directory arguments."""

from __future__ import annotations

import argparse

from rich.console import Console

from peftkit.recipe import registry
from peftkit.recipe.registry import Entry
from peftkit.recipe.overrides import apply_overrides
from peftkit.recipe.schema import Recipe

RUN_HELP = "run directory written by `peftkit train` (e.g. runs/demo)"


def make_console() -> Console:
    """A rich console for command output; never highlights, never folds in logs."""
    console = Console(highlight=False)
    if not console.is_terminal:  # pipes and CI logs: wide enough not to fold every cell
        console = Console(highlight=False, width=140)
    return console


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, with its errors on one line like every other peftkit error (its subcommand
    parsers are of the same class)."""

    def error(self, message: str):
        self.exit(2, f"error: {message}; see `{self.prog} --help`\n")


def add_command(subparsers, name: str, handler, help_: str,
                examples: str) -> argparse.ArgumentParser:
    """Add `peftkit NAME`: its one-line help (also its description), its examples (the epilog
    of its --help), --debug, and the handler that runs it."""
    parser = subparsers.add_parser(name, help=help_, description=help_, epilog=examples,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks of errors")
    parser.set_defaults(func=handler)
    return parser


def add_recipe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe name (see `peftkit ls`) or path to a .py recipe")
    parser.add_argument("overrides", nargs="*", metavar="section.field=value",
                        help="override recipe settings, e.g. train.lr=1e-4 adapter.r=32")


def resolve_recipe(args) -> tuple[Entry, Recipe]:
    """The recipe named by `args.recipe`, as registered and with `args.overrides` applied."""
    entry = registry.resolve(args.recipe)
    return entry, apply_overrides(entry.recipe, args.overrides)
