"""`peftkit cp`: copy a recipe to a .py file the user edits and trains."""

from __future__ import annotations

import shutil
from pathlib import Path

from peftkit.cli.common import add_command, make_console
from peftkit.errors import UserError
from peftkit.recipe import registry

HELP = "copy a recipe to a file you can edit"
EXAMPLES = """\
examples:
  peftkit cp demo my_recipe.py   # then edit it and:
  peftkit train my_recipe.py"""


def add_parser(subparsers) -> None:
    p = add_command(subparsers, "cp", cmd_cp, HELP, EXAMPLES)
    p.add_argument("recipe", help="recipe name or path")
    p.add_argument("dest", help="destination .py file")
    p.add_argument("--force", action="store_true", help="replace DEST if it exists")


def cmd_cp(args) -> int:
    entry = registry.resolve(args.recipe)
    dest = Path(args.dest)
    if dest.suffix != ".py":
        raise UserError(f"{dest}: the copy must be a .py file (e.g. my_recipe.py)")
    if dest.exists() and not args.force:
        raise UserError(f"{dest} already exists; choose another name or pass --force")
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(entry.path, dest)
    make_console().print(f"copied {entry.name} to {dest}; edit it, then: peftkit train {dest}")
    return 0
