#!/usr/bin/env python
"""Generate the offline "sort_reverse" demo instruction dataset.

Each JSONL row is a chat conversation with a checkable answer::

    {"messages":[{"role":"user","content":"Sort: 3 9 1 4"},{"role":"assistant","content":"1 3 4 9"}]}
    {"messages":[{"role":"user","content":"Reverse: q b x"},{"role":"assistant","content":"x b q"}]}

* Sort: 3-5 digits (0-9, repeats allowed), answer sorted ascending.
  (Duplicate prompts are redrawn within the same task type, so train has
  fewer 3-digit sorts than the uniform 1/3: only 1000 distinct ones exist.)
* Reverse: 3-5 lowercase letters, answer in reverse order.
* 50/50 mix, generated with ``random.Random(0)``.
* The test split is drawn first; every user prompt is unique within and
  across splits, so no test prompt appears in train.

The output is byte-for-byte deterministic (compact JSON, ``\\n`` line endings).

Usage: python scripts/make_demo_data.py [--out-dir DIR] [--n-train N] [--n-test N]
"""

from __future__ import annotations

import argparse
import json
import random
import string
from collections import Counter
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "peftkit" / "assets" / "data" / "sort_reverse"

DIGITS = string.digits
LETTERS = string.ascii_lowercase


def draw_kind(rng: random.Random) -> str:
    """Pick the task type: "sort" or "reverse" with probability 1/2 each."""
    return "sort" if rng.random() < 0.5 else "reverse"


def make_example(rng: random.Random, kind: str) -> dict:
    """Draw one example of the given task type with 3-5 items."""
    n = rng.randint(3, 5)
    if kind == "sort":
        items = [rng.choice(DIGITS) for _ in range(n)]
        prompt = "Sort: " + " ".join(items)
        answer = " ".join(sorted(items))
    else:
        items = [rng.choice(LETTERS) for _ in range(n)]
        prompt = "Reverse: " + " ".join(items)
        answer = " ".join(reversed(items))
    return {
        "messages": [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": answer},
        ]
    }


def draw_unique(rng: random.Random, n: int, seen: set[str]) -> list[dict]:
    """Draw ``n`` examples whose user prompt is not in ``seen`` (updates ``seen``).

    The task type is drawn once per row and kept while redrawing duplicates, so
    the sort/reverse mix stays ~50/50 even though the sort prompt space is small
    (only 1000 distinct 3-digit prompts): duplicates are redrawn within the same
    task type, which lowers the share of 3-digit sorts in a large split.
    """
    rows: list[dict] = []
    while len(rows) < n:
        kind = draw_kind(rng)
        while True:
            ex = make_example(rng, kind)
            prompt = ex["messages"][0]["content"]
            if prompt not in seen:
                break
        seen.add(prompt)
        rows.append(ex)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--n-train", type=int, default=10000)
    ap.add_argument("--n-test", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    t0 = time.perf_counter()
    rng = random.Random(args.seed)
    seen: set[str] = set()
    test = draw_unique(rng, args.n_test, seen)  # test drawn first
    train = draw_unique(rng, args.n_train, seen)

    test_prompts = {r["messages"][0]["content"] for r in test}
    train_prompts = {r["messages"][0]["content"] for r in train}
    assert not (test_prompts & train_prompts), "test prompt leaked into train"
    assert len(test_prompts) == len(test) and len(train_prompts) == len(train)

    write_jsonl(args.out_dir / "train.jsonl", train)
    write_jsonl(args.out_dir / "test.jsonl", test)
    dt = time.perf_counter() - t0

    for name, rows in (("train", train), ("test", test)):
        path = args.out_dir / f"{name}.jsonl"
        n_sort = sum(r["messages"][0]["content"].startswith("Sort:") for r in rows)
        lengths = Counter(
            (r["messages"][0]["content"].split(":")[0], len(r["messages"][1]["content"].split()))
            for r in rows
        )
        print(f"{path}: {len(rows)} rows, {n_sort} sort / {len(rows) - n_sort} reverse, "
              f"{path.stat().st_size} bytes")
        print("  (task, n_items) counts:", dict(sorted(lengths.items())))
    print(f"example: {json.dumps(train[0], separators=(',', ':'))}")
    print(f"done in {dt:.2f}s")


if __name__ == "__main__":
    main()
