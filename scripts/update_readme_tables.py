"""Refresh the generated tables in README.md from committed results.

Benchmarks: the table between `<!-- bench:start -->` and `<!-- bench:end -->` is generated
from benchmarks/results/*.json (see benchmarks/run.py). Run after new results:

    python scripts/update_readme_tables.py           # rewrite README.md
    python scripts/update_readme_tables.py --check   # exit 1 if README.md is out of date
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def bench_table() -> str:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--markdown"],
                          check=True, capture_output=True, text=True).stdout.strip()


def replace_block(text: str, body: str) -> str:
    if START not in text or END not in text:
        raise SystemExit(f"README.md has no {START} ... {END} block")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{body}\n{END}{tail}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    readme = ROOT / "README.md"
    old = readme.read_text()
    new = replace_block(old, bench_table())
    if args.check:
        if new != old:
            print("README.md benchmark table is out of date: run scripts/update_readme_tables.py")
            return 1
        return 0
    readme.write_text(new)
    print("README.md: benchmark table updated" if new != old else "README.md: up to date")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
