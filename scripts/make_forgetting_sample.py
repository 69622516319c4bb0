#!/usr/bin/env python
"""Build the general-English sample of the forgetting meter (peftkit/training/forgetting.py).

Source: the `chitchat-dataset` PyPI package (BYU PCC lab's Chit-Chat Challenge, MIT license):
7,168 real, human-written open-domain English conversations. Why it: real everyday English
(not generated, not code, not a benchmark anyone fine-tunes on), unrelated to any task peftkit
ships, permissively licensed (its notice is copied next to the sample), and offline through
the ordinary PyPI client:

    python -m pip download --no-deps chitchat-dataset -d /tmp/cc
    unzip -q /tmp/cc/*.whl -d /tmp/cc
    python scripts/make_forgetting_sample.py /tmp/cc

Each sample is one conversation picked with random.Random(0): its utterances, one a line, in
order, up to MAX_CHARS characters (about 100 tokens), as {"text": ...}. Deterministic output.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "peftkit" / "assets" / "data" / "chitchat_sample"
SAMPLES = 64
MAX_CHARS = 400


def conversation_text(convo: dict) -> str:
    lines, size = [], 0
    for turn in convo["messages"]:
        for utterance in turn:
            line = " ".join(utterance["text"].split())
            if size + len(line) > MAX_CHARS:
                return "\n".join(lines)
            lines.append(line)
            size += len(line) + 1
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("unpacked_wheel", type=Path, help="folder holding chitchat_dataset/ and "
                                                      "chitchat_dataset-*.dist-info/")
    ap.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    convos = json.loads((args.unpacked_wheel / "chitchat_dataset" / "dataset.json").read_text())
    rng = random.Random(0)
    texts = []
    for key in rng.sample(sorted(convos), 4 * SAMPLES):
        text = conversation_text(convos[key])
        if text.count("\n") >= 3:  # at least four utterances: a conversation, not a greeting
            texts.append(text)
        if len(texts) == SAMPLES:
            break
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with open(args.out_dir / "sample.jsonl", "w", encoding="utf-8", newline="\n") as f:
        for text in texts:
            f.write(json.dumps({"text": text}, ensure_ascii=False, separators=(",", ":")) + "\n")
    (license_file,) = args.unpacked_wheel.glob("chitchat_dataset-*.dist-info/LICENSE")
    shutil.copyfile(license_file, args.out_dir / "LICENSE")
    print(f"{args.out_dir}: {len(texts)} conversations, {sum(map(len, texts))} characters")


if __name__ == "__main__":
    main()
