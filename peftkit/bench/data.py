"""Deterministic training data for throughput benchmarks: synthetic lengths, and real ones.

Synthetic text is random words of the demo tokenizer's vocabulary (each a single token), so a sample's
token count is what was drawn. It is not learnable beyond word frequencies, and need not be:
the benchmarks measure speed and memory of the same work, not what the model learns.

- `varlen`: instruction-like lengths, lognormal with median 220 tokens and sigma 0.8 (a long
  tail: mean ~300, 5% above ~800), clipped to 16..1024; the prompt is 15-60% of a sample and
  carries no loss, the completion and EOS do.
- `fixed`: every sample exactly 256 tokens (64 prompt + 191 completion + EOS).
- `chitchat`: real conversations, as `messages` chats: the human-written open-domain English
  of PyPI package `chitchat-dataset` (BYU PCC lab, MIT; in `peftkit[bench]`), each speaker's
  consecutive utterances one turn, the first speaker `user`, the other `assistant`. For a real
  model with its chat template: real lengths and real text (mean 33 turns; one-sided
  conversations, with no reply, are left out).
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

from peftkit.errors import UserError

KINDS = ("varlen", "fixed", "chitchat")
CHITCHAT = ("chitchat-dataset", "chitchat_dataset/dataset.json")  # (package, file in it)
MEDIAN, SIGMA, SHORTEST, LONGEST = 220, 0.8, 16, 1024
FIXED_PROMPT, FIXED_COMPLETION = 64, 191


def _words() -> list[str]:
    """Words that are one token each, also after another word (byte-level BPE: "Ġword")."""
    from transformers import AutoTokenizer

    from peftkit.model.tiny import tokenizer_dir

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir())
    candidates = sorted(t[1:] for t in tokenizer.get_vocab()
                        if t.startswith("Ġ") and t[1:].isalpha() and len(t) > 2)
    ids = tokenizer([f" {w} {w}" for w in candidates], add_special_tokens=False)["input_ids"]
    return [w for w, pair in zip(candidates, ids) if len(pair) == 2]


def _lengths(kind: str, rng: random.Random) -> tuple[int, int]:
    """(prompt tokens, completion words) of one sample; + EOS = its token count."""
    if kind == "fixed":
        return FIXED_PROMPT, FIXED_COMPLETION
    total = round(math.exp(rng.gauss(math.log(MEDIAN), SIGMA)))
    total = min(max(total, SHORTEST), LONGEST)
    prompt = max(4, round(total * rng.uniform(0.15, 0.6)))
    return prompt, max(1, total - prompt - 1)


def chitchat_rows(n: int, seed: int = 0) -> list[dict]:
    """n conversations of chitchat-dataset picked with random.Random(seed), as chats."""
    from importlib import metadata

    package, file = CHITCHAT
    try:
        path = Path(str(metadata.distribution(package).locate_file(file)))
    except metadata.PackageNotFoundError:
        raise UserError(f"benchmark data 'chitchat' needs package {package}: pip install "
                        f"{package} (or pip install 'peftkit[bench]')") from None
    convos = json.loads(path.read_text(encoding="utf-8"))
    chats = []
    for key in sorted(convos):
        turns = ["\n".join(" ".join(u["text"].split()) for u in turn)
                 for turn in convos[key]["messages"]]
        if len(turns) >= 2 and all(turns):  # a reply to learn from, and no empty turn
            chats.append({"messages": [{"role": ("user", "assistant")[i % 2], "content": t}
                                       for i, t in enumerate(turns)]})
    if n > len(chats):
        raise UserError(f"benchmark data 'chitchat': {n} conversations asked, the dataset has "
                        f"{len(chats)} with a reply; ask for at most that many")
    return random.Random(f"chitchat-{seed}").sample(chats, n)


def rows(kind: str, n: int, seed: int = 0) -> list[dict]:
    if kind not in KINDS:
        raise ValueError(f"unknown benchmark data kind {kind!r}; use one of {KINDS}")
    if kind == "chitchat":
        return chitchat_rows(n, seed)
    words, rng = _words(), random.Random(f"{kind}-{seed}")
    out = []
    for _ in range(n):
        n_prompt, n_completion = _lengths(kind, rng)
        text = lambda k: "".join(" " + rng.choice(words) for _ in range(k))  # noqa: E731
        # The prompt's tokens: "Q", ":" and words (this tokenizer adds no BOS to raw text).
        out.append({"prompt": "Q:" + text(n_prompt - 2), "completion": text(n_completion)})
    return out


def dataset_file(kind: str, n: int = 512, seed: int = 0) -> str:
    """Path of the `kind` dataset (a prompt/completion JSONL), written on first use."""
    from peftkit.model.tiny import cache_root

    path = Path(cache_root()) / "bench-data" / f"{kind}-{n}-{seed}.jsonl"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{id(path)}.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows(kind, n, seed)))
        tmp.rename(path)
    return str(path)
