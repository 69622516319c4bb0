#!/usr/bin/env python
"""Build the offline preference set "sort_reverse_pairs" from the sort_reverse demo data.

Every pair has the demo task's prompt, its correct answer as `chosen`, and as `rejected` the
same answer with one adjacent pair of different items swapped::

    {"prompt": "Sort: 7 6 2", "chosen": "2 6 7", "rejected": "6 2 7"}

Why the preferences mean something: the task has one verifiable right answer (sorted digits,
reversed letters), so `chosen` is right by construction and `rejected` is wrong by exactly one
transposition. The rejected answer has the same items, length and format as the chosen one:
the only thing that separates the two is the rule the task asks for, so a model can only
prefer `chosen` reliably by learning that rule. Prompts whose items are all the same (no
near-miss exists) are left out.

train.jsonl (2,000 pairs, from sort_reverse/train.jsonl) uses the string shape; test.jsonl
(199 pairs: the 200 prompts of sort_reverse/test.jsonl, none of them in train, less one with
no near miss) uses the conversational shape of HuggingFaceH4/ultrafeedback_binarized: `prompt` a string, `chosen` and
`rejected` the whole conversation, user turn first. Deterministic: random.Random(0).

Usage: python scripts/make_preference_data.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "peftkit" / "assets" / "data"
SOURCE, OUT = DATA / "sort_reverse", DATA / "sort_reverse_pairs"


def near_miss(answer: str, rng: random.Random) -> str | None:
    """`answer` with one random adjacent pair of different items swapped (None: no such pair)."""
    items = answer.split(" ")
    spots = [i for i in range(len(items) - 1) if items[i] != items[i + 1]]
    if not spots:
        return None
    i = rng.choice(spots)
    items[i], items[i + 1] = items[i + 1], items[i]
    return " ".join(items)


def pairs(source: Path, n: int, rng: random.Random, conversational: bool) -> list[dict]:
    out = []
    for line in source.read_text().splitlines():
        user, assistant = json.loads(line)["messages"]
        rejected = near_miss(assistant["content"], rng)
        if rejected is None:
            continue
        prompt, chosen = user["content"], assistant["content"]
        if conversational:
            turn = {"role": "user", "content": prompt}
            out.append({"prompt": prompt,
                        "chosen": [turn, {"role": "assistant", "content": chosen}],
                        "rejected": [turn, {"role": "assistant", "content": rejected}]})
        else:
            out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        if len(out) == n:
            break
    return out


def main() -> None:
    rng = random.Random(0)
    OUT.mkdir(parents=True, exist_ok=True)
    for split, n, conversational in (("train", 2000, False), ("test", 200, True)):
        rows = pairs(SOURCE / f"{split}.jsonl", n, rng, conversational)
        text = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in rows)
        (OUT / f"{split}.jsonl").write_text(text)
        print(f"{OUT / f'{split}.jsonl'}: {len(rows)} pairs")


if __name__ == "__main__":
    main()
