"""README.md and docs/ stay true, cheaply (nothing trains, nothing loads weights): every command
shown parses with peftkit's own parser and names a real recipe, every `section.field` is a
recipe field and every `section.field=value` a value it accepts, every link, file path and
named function exists, the code map lists every package, and the README stays a front door."""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from peftkit.errors import ConfigError
from peftkit.recipe import registry
from peftkit.recipe.overrides import apply_overrides, parse_overrides
from peftkit.recipe.schema import SECTIONS

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
MAX_README_LINES = 300
# Modules the docs name that a parallel branch of the package restructuring is creating now
# (split out of peftkit/data/records.py). Remove an entry once the file exists.
PLANNED: set[str] = set()  # paths the docs may name before they exist (none now)


def text(page: Path) -> str:
    return page.read_text()


def rel(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def fenced_blocks(page: Path) -> list[tuple[str, list[str]]]:
    """(language, lines) of every ``` block of a page."""
    blocks, lang, lines = [], None, []
    for line in text(page).splitlines():
        if line.startswith("```"):
            if lang is None:
                lang, lines = line[3:].strip(), []
            else:
                blocks.append((lang, lines))
                lang = None
        elif lang is not None:
            lines.append(line)
    return blocks


def shell_lines(page: Path) -> list[str]:
    """Command lines: every line of a ```bash block, and `$ ` lines of transcripts, with `\\`
    continuations joined."""
    out = []
    for lang, lines in fenced_blocks(page):
        if lang == "bash":
            joined = "\n".join(lines).replace("\\\n", " ")
            out += [ln for ln in joined.splitlines() if ln.strip()]
        elif lang == "":
            out += [ln[2:] for ln in lines if ln.startswith("$ ")]
    return out


def peftkit_argv(line: str) -> list[str] | None:
    """The arguments after `peftkit` (or `-m peftkit`, or `| peftkit`) on a command line."""
    words = shlex.split(line, comments=True)
    for i, word in enumerate(words):
        at_start = i == 0 or words[i - 1] in ("-m", "|")
        if at_start and (word == "peftkit" or word.endswith("/peftkit")):
            return words[i + 1:]
    return None


def commands() -> list[tuple[str, list[str]]]:
    return [(f"{rel(page)}: {line.strip()}", argv) for page in PAGES
            for line in shell_lines(page) if (argv := peftkit_argv(line)) is not None]


def cli_module():
    """The module of the `peftkit` console script (pyproject.toml), which builds the parser."""
    script = re.search(r'^peftkit = "([\w.]+):', (ROOT / "pyproject.toml").read_text(), re.M)
    return importlib.import_module(script.group(1))


@pytest.fixture(scope="module")
def parser():
    """peftkit's parser, taking only whole option names: the docs show `--resume`, not `--res`."""
    parser = cli_module().build_parser()
    for p in [parser, *command_parsers(parser).values()]:
        p.allow_abbrev = False
    return parser


def command_parsers(parser) -> dict:
    return next(a for a in parser._actions if a.dest == "command").choices


def test_readme_is_a_front_door_that_links_every_docs_page():
    lines = text(README).count("\n")
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; move depth into docs/"
    for page in DOCS:
        assert f"](docs/{page.name})" in text(README), f"README.md does not link {rel(page)}"
        if page.name != "README.md":
            assert f"]({page.name})" in text(ROOT / "docs" / "README.md"), \
                f"docs/README.md does not list {page.name}"


def test_two_commands_are_makefile_targets():
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))
    shown = set()
    for page in PAGES:
        for line in shell_lines(page):
            words = shlex.split(line, comments=True)
            if words[:1] == ["make"]:
                shown.update(words[1:])
    assert {"demo", "test"} <= shown <= targets, (shown, targets)


def test_every_command_shown_parses_and_names_a_real_recipe(parser):
    shipped = registry.shipped()
    shown = [(where, parse(parser, where, argv)) for where, argv in commands()]
    assert len(shown) > 40, "the command extraction found too few commands"
    copies = {args.dest for _, args in shown if args.command == "cp"}
    for where, args in shown:
        recipe, overrides = getattr(args, "recipe", None), getattr(args, "overrides", [])
        if recipe in shipped:
            try:
                apply_overrides(shipped[recipe].recipe, overrides)
            except ConfigError as exc:
                pytest.fail(f"{where}: {exc}")
        elif recipe is not None:
            # A recipe file: one in the repository (not imported: benchmarks/recipes/ build
            # their data when loaded), or a copy a `peftkit cp` shown in the docs makes.
            assert (ROOT / recipe).is_file() or recipe in copies, f"{where}: no recipe {recipe!r}"
            assert not parse_overrides(overrides)[1], f"{where}: {parse_overrides(overrides)[1]}"



def recipe_comment_commands() -> list[tuple[str, list[str]]]:
    """`peftkit ...` commands in the shipped recipes' comments (`#   peftkit a; peftkit b`)."""
    out = []
    for path in sorted((ROOT / "recipes").glob("*.py")):
        for line in path.read_text().splitlines():
            if line.lstrip().startswith("#"):
                for part in line.lstrip("# ").split(";"):
                    if part.strip().startswith("peftkit ") and \
                            (argv := peftkit_argv(part)) is not None:
                        out.append((f"{path.relative_to(ROOT).as_posix()}: {part.strip()}",
                                    argv))
    return out


def test_every_adapter_init_shown_starts_from_a_run_that_fits(parser):
    """`peftkit train B model.adapter_init=runs/A` (SFT, then DPO): the run of shipped recipe
    A has the base model and the adapter that B builds, so its adapter loads into B."""
    shipped, checked = registry.shipped(), 0
    for where, argv in commands() + recipe_comment_commands():
        args = parse(parser, where, argv)
        overrides = getattr(args, "overrides", [])
        starts = [o.partition("=")[2] for o in overrides if o.startswith("model.adapter_init=")]
        if not starts or args.recipe not in shipped:
            continue
        start = re.fullmatch(r"(?:\./)?runs/([\w-]+)/?", starts[0])
        assert start and start.group(1) in shipped, f"{where}: not the run of a shipped recipe"
        first = shipped[start.group(1)].recipe
        then = apply_overrides(shipped[args.recipe].recipe, overrides)
        for section, keys in (("model", ("name", "gguf_file", "arch", "tiny", "tiny_size")),
                              ("adapter", tuple(f.name for f in dataclasses.fields(then.adapter)
                                                if f.name != "dropout"))):
            a, b = getattr(first, section), getattr(then, section)
            assert [getattr(a, k) for k in keys] == [getattr(b, k) for k in keys], \
                f"{where}: runs/{start.group(1)} has another {section} than {args.recipe}"
        checked += 1
    assert checked >= 2  # docs/preference.md and recipes/demo_dpo.py

def parse(parser, where: str, argv: list[str]):
    try:
        return parser.parse_args(argv)
    except SystemExit:
        pytest.fail(f"{where}: does not parse")


def test_every_peftkit_command_in_prose_exists(parser):
    names = set(command_parsers(parser))
    for page in PAGES:
        for name in re.findall(r"`(?:\$ )?peftkit (\w+)", text(page)):
            assert name in names, f"{rel(page)}: `peftkit {name}` is not a command"


SETTING = re.compile(r"(?<![\w./:-])(" + "|".join(SECTIONS) + r")\.([a-z_]\w*)(?![\w/])")
FILE_TYPES = {"py", "md", "json", "jsonl", "csv", "parquet", "png", "txt", "yaml", "pt"}  # hub.py


def test_every_setting_named_is_a_recipe_field():
    fields = {s: {f.name for f in dataclasses.fields(c)} for s, c in SECTIONS.items()}
    for page in PAGES:
        for section, name in SETTING.findall(text(page)):
            if name in FILE_TYPES:
                continue
            assert name in fields[section], f"{rel(page)}: {section}.{name} is not a setting"


def test_every_override_shown_is_a_value_the_field_accepts():
    demo, checked = registry.shipped()["tiny-demo"].recipe, 0
    for page in PAGES:
        for span in re.findall(r"`([^`\n]+)`", text(page)):
            items = span.split()
            if not all(SETTING.match(i) and "=" in i for i in items):
                continue
            for item in items:
                key, _, value = item.partition("=")
                for alternative in filter(None, value.split("|")):  # `adapter.init=pissa|olora`
                    problems = refused_values(demo, f"{key}={alternative}")
                    assert not problems, f"{rel(page)}: `{item}`: {problems}"
                    checked += 1
    assert checked > 30


def refused_values(recipe, override: str) -> list[str]:
    """Problems with the value itself: its type, or a choice that does not exist. Not how it
    combines with the rest of the recipe, which a setting's example need not match."""
    problems = parse_overrides([override])[1]
    try:
        apply_overrides(recipe, [override])
    except ConfigError as exc:
        key = override.partition("=")[0]
        problems += [p for p in exc.problems if p.startswith(key) and "must be one of" in p]
    return problems


def test_every_relative_link_and_anchor_exists():
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", text(page)):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            assert dest.exists(), f"{rel(page)}: link to {target} is broken"
            if anchor:
                assert anchor in anchors(dest), f"{rel(page)}: no heading #{anchor} in {dest.name}"


def anchors(page: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces to dashes."""
    ids, in_block = set(), False
    for line in text(page).splitlines():
        in_block ^= line.startswith("```")
        if not in_block and line.startswith("#"):
            ids.add(re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-"))
    return ids


REPO_PATH = re.compile(r"(?<![\w./~-])((?:peftkit|scripts|tests|benchmarks|recipes|docs)/[\w./-]*)")
# a `<placeholder>` ends the match: `peftkit/cli/<command>.py` checks peftkit/cli/


def test_every_file_path_mentioned_exists():
    for page in PAGES:
        for path in REPO_PATH.findall(text(page)):
            path = path.rstrip(".")
            assert (ROOT / path).exists() or path in PLANNED, f"{rel(page)}: {path} does not exist"
        for asset in re.findall(r"peftkit:([\w./-]+\w)", text(page)):
            assert (ROOT / "peftkit" / "assets" / asset).is_file(), \
                f"{rel(page)}: peftkit:{asset} ships no such file"


def test_every_function_named_in_a_module_is_defined_there():
    pattern = re.compile(r"((?:`\w+`(?:, then |, | and ))*`\w+`) in `(peftkit/[\w/]+\.py)`")
    found = 0
    for page in PAGES:
        for names, path in pattern.findall(text(page)):
            source = (ROOT / path).read_text()
            for name in re.findall(r"`(\w+)`", names):
                assert re.search(rf"^(?:def|class) {name}\b|^{name}\s*=", source, re.M), \
                    f"{rel(page)}: {path} defines no {name}"
                found += 1
    assert found >= 3


def test_code_map_lists_every_package_and_real_modules():
    rows = {m[0]: m[1] for m in re.findall(r"^\| `(peftkit/[\w/.]+)` \|.*\| *(.*?) *\|$",
                                           text(README), re.M)}
    packages = {p.parent.relative_to(ROOT).as_posix() + "/"
                for p in (ROOT / "peftkit").glob("*/__init__.py") if p.parent.name != "assets"}
    assert packages <= set(rows), f"README code map misses {packages - set(rows)}"
    for package, modules in rows.items():
        for module in re.findall(r"`([\w]+\.py)`", modules):
            path = package + module
            assert (ROOT / path).is_file() or path in PLANNED, f"code map: {path} does not exist"


def test_benchmark_table_markers_and_generator_agree():
    readme = text(README)
    assert readme.count("<!-- bench:start -->") == 1 and readme.count("<!-- bench:end -->") == 1
    assert readme.index("<!-- bench:start -->") < readme.index("<!-- bench:end -->")
    check = subprocess.run([sys.executable, str(ROOT / "scripts" / "update_readme_tables.py"),
                            "--check"], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert check.returncode == 0, check.stdout + check.stderr
