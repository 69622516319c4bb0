"""The `peftkit` command line: the table of commands, and errors turned into exit codes.

Each command is one module of this package (ls.py, show.py, ...) holding its examples, the
function that adds its subparser, and its handler; COMMANDS lists them in `--help` order.

Exit codes: 0 success, 2 bad input (one line, no traceback; --debug shows it), 1 anything
else (a run that cannot go on, e.g. diverged or disk full: one line too), 130 / 143 when
SIGINT / SIGTERM stopped training after writing a checkpoint (docs/reliability.md).
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import traceback
from pathlib import Path

from peftkit import __version__
from peftkit.cli import bench, cp, doctor, generate, ls, merge, push, show, train
from peftkit.cli import eval as eval_  # the module `eval`, not the builtin
from peftkit.cli.common import OneLineErrorParser
from peftkit.errors import RunError, UserError
from peftkit.run.busy_cores import wait_passively_on_busy_cores
from peftkit.run.quiet import quiet_libraries
from peftkit.training.launcher import report_status
from peftkit.training.signals import Interrupted

# `peftkit --help` lists the commands in this order (generate adds generate and chat).
COMMANDS = (ls, show, cp, train, bench, eval_, generate, doctor, merge, push)
# The commands that compute with torch on the CPU (run/busy_cores.py).
COMPUTES = {"train", "bench", "eval", "generate", "chat", "merge"}


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="peftkit", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Parameter-efficient fine-tuning of LLMs by recipe.",
        epilog="examples:\n  peftkit ls\n  peftkit show demo\n  peftkit train demo\n"
               "  peftkit cp demo mine.py && peftkit train mine.py train.lr=5e-4")
    parser.add_argument("--version", action="version", version=f"peftkit {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    code = _main(argv)
    report_status(code)
    return code


def _main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = _parse(parser, argv)
    except SystemExit as exc:  # argparse: 2 on bad arguments, 0 on --help
        return int(exc.code or 0)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    quiet_libraries()
    if args.command in COMPUTES:
        note = wait_passively_on_busy_cores()
        if note:
            print(note, file=sys.stderr)
    try:
        return args.func(args)
    except (UserError, RunError) as exc:  # one line, no traceback (see errors.py)
        if args.debug:
            traceback.print_exc()
        # Workers all fail alike: say it once per machine (each machine's own launcher).
        if os.environ.get("LOCAL_RANK", "0") == "0":
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


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
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
    return args


def _override_after_resume(args) -> None:
    """`train demo --resume train.lr=1e-4`: --resume takes an optional CHECKPOINT, so
    argparse hands it the override; give it back (a real path containing '=' stays)."""
    value = getattr(args, "resume", None)
    if isinstance(value, str) and "=" in value and not Path(value).exists():
        args.overrides, args.resume = [*args.overrides, value], True


def _one_line_report(exc: Exception, args) -> str:
    """`error: ...` (or `stopped by SIGTERM ...`), plus the command that continues a run
    that ended on a complete checkpoint."""
    line = " ".join(str(exc).split())
    if getattr(exc, "resumable", False) and getattr(args, "command", None) == "train":
        line += f". Resume with: {train.resume_command(args)}"
    return line if isinstance(exc, Interrupted) else f"error: {line}"


if __name__ == "__main__":
    raise SystemExit(main())
