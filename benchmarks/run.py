"""Run the benchmark suite (suite.py) and write benchmarks/results/<entry>.json.

    python benchmarks/run.py                   # every entry (~15-20 min on 2 CPU cores)
    python benchmarks/run.py --only small      # entries whose label contains "small"
    python benchmarks/run.py --markdown        # print the table of the committed results
    python scripts/update_readme_tables.py     # put that table into README.md

Each entry is one `peftkit bench` invocation: peftkit and its baselines, each side in its own
fresh process. Before each entry the runner waits (up to --max-wait seconds) for the 1-minute
load average to fall below --max-load, since the machine may be shared; the load before each
side is recorded in the results either way.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))

import suite  # noqa: E402


def load_results() -> list[dict]:
    order = {e.slug: i for i, e in enumerate(suite.entries())}
    results = [json.loads(p.read_text()) for p in RESULTS.glob("*.json")
               if not p.name.startswith("ablation-")]
    return sorted(results, key=lambda r: order.get(r.get("slug"), len(order)))


def markdown() -> str:
    from peftkit.bench.report import markdown as table

    results = load_results()
    if not results:
        return "(no results yet: run python benchmarks/run.py)"
    from ablation import markdown as ablation_table

    env = results[0]["environment"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    text = (table(results) + f"\n\n{env['device']}, {env['threads']} threads; {versions}; "
            f"commit {str(env['git_commit'])[:10]}{' (dirty)' if env['git_dirty'] else ''}.")
    # Rows measured on another host (hosts vary between sessions): say which, per row.
    others = [f"{r['label']}: {r['environment']['device']}, commit "
              f"{str(r['environment']['git_commit'])[:10]}" for r in results[1:]
              if r["environment"]["device"] != env["device"]]
    if others:
        text += " Measured on other hosts: " + "; ".join(others) + "."
    for path in sorted(RESULTS.glob("ablation-*.json")):
        text += "\n\n" + ablation_table(json.loads(path.read_text()))
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="run entries whose label contains this")
    parser.add_argument("--markdown", action="store_true", help="print the results table only")
    parser.add_argument("--max-load", type=float, default=0.5)
    parser.add_argument("--max-wait", type=float, default=900)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.markdown:
        print(markdown())
        return 0

    from peftkit.bench import harness as bench
    from peftkit.bench import report as bench_report
    from peftkit.recipe import registry
    from peftkit.recipe.overrides import apply_overrides

    RESULTS.mkdir(parents=True, exist_ok=True)
    failed = []
    for entry in suite.entries():
        if args.only not in entry.label:
            continue
        load = suite.wait_for_quiet(args.max_load, args.max_wait)
        print(f"== {entry.label} (load {load:.2f})", file=sys.stderr, flush=True)
        found = registry.resolve(entry.path)
        recipe = apply_overrides(found.recipe, list(entry.overrides))
        out = RESULTS / f"{entry.slug}.json"
        result = bench.bench(recipe, entry.path, list(entry.vs), entry.steps, None,
                             threads=args.threads, repeat=entry.repeat)
        result.update(label=entry.label, slug=entry.slug, overrides=list(entry.overrides),
                      source=str(Path(entry.path).relative_to(HERE.parent)))
        out.write_text(json.dumps(result, indent=1) + "\n")
        bench_report.plot(result, out.with_suffix(".png"))
        from rich.console import Console

        Console(width=140).print(bench_report.table(result))
        for line in bench_report.footer(result):
            print(line)
        if not result["equal_work"]["ok"]:
            failed.append(entry.label)
    print(markdown())
    if failed:
        print(f"refused comparisons (not the same work): {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
