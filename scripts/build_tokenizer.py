#!/usr/bin/env python
"""Build the small offline byte-level BPE tokenizer shipped in peftkit/assets/tokenizer.

Training corpus (all local, no network):
  * the Python standard library ``.py`` sources (sorted file list under
    ``sysconfig.get_paths()["stdlib"]``, skipping ``site-packages``, ``test``,
    ``tests`` and ``idlelib`` directories), capped at ~20 MB;
  * plus the demo-task vocabulary (space-separated digits and lowercase
    letters, "Sort:", "Reverse:", "User:", "Assistant:", "System:") repeated
    a few hundred times, so the demo data tokenizes compactly (one token per
    digit/letter, with its leading space).

The result is wrapped as a ``transformers.PreTrainedTokenizerFast`` with three
special tokens ``<|pad|>``=0, ``<|bos|>``=1, ``<|eos|>``=2 and a chat template,
and saved with ``save_pretrained``.

Note: the learned merges depend on the stdlib sources of the Python that runs
this script, so rebuilding under another Python version may give a different
(but equally usable) tokenizer. The build itself is deterministic.

Usage: python scripts/build_tokenizer.py [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import string
import sysconfig
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "peftkit" / "assets" / "tokenizer"

VOCAB_SIZE = 4096
MIN_FREQUENCY = 2
CORPUS_CAP_BYTES = 20_000_000
EXCLUDED_DIRS = {"site-packages", "test", "tests", "idlelib"}
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>"]  # ids 0, 1, 2
DEMO_REPEATS = 500

# Renders OpenAI-style messages (system optional):
#   <|bos|>System: ...\nUser: ...\nAssistant: ...<|eos|>User: ...\nAssistant: ...<|eos|>
# With add_generation_prompt=True it ends in "Assistant:", so the rendering of
# messages[:-1] + generation prompt is an exact prefix of the full rendering and
# the assistant completion is " <content><|eos|>" (leading space).
# Written on one line with explicit "\n" so Jinja's trim_blocks/lstrip_blocks
# (enabled by transformers) cannot change the whitespace.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{{ 'System: ' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'user' %}"
    "{{ 'User: ' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ 'Assistant: ' + message['content'] + eos_token }}"
    "{% else %}"
    "{{ raise_exception('Unsupported role: ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS]
        files.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    return sorted(files)


def stdlib_corpus(cap: int = CORPUS_CAP_BYTES) -> tuple[list[str], int, int]:
    """Return (texts, n_files, n_bytes) with the stdlib sources up to ``cap`` bytes."""
    texts: list[str] = []
    total = 0
    for path in stdlib_files():
        if total >= cap:
            break
        text = path.read_text(encoding="utf-8", errors="replace")
        texts.append(text)
        total += len(text.encode("utf-8"))
    return texts, len(texts), total


def demo_corpus(repeats: int = DEMO_REPEATS) -> list[str]:
    digits = " ".join(string.digits)
    letters = " ".join(string.ascii_lowercase)
    block = "\n".join(
        [
            f"Sort: {digits}",
            f"Reverse: {letters}",
            f"User: Sort: {digits}\nAssistant: {digits}",
            f"User: Reverse: {letters}\nAssistant: {letters[::-1]}",
            "System: You are a helpful assistant.",
            "Sort: Reverse: User: Assistant: System:",
        ]
    )
    return [block] * repeats


def train_backend(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=MIN_FREQUENCY,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


def wrap(backend):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        model_max_length=4096,
        padding_side="right",
        chat_template=CHAT_TEMPLATE,
    )


def check_prefix_property(tok) -> None:
    convs = {
        "1-turn": [
            {"role": "user", "content": "Sort: 3 1 2"},
            {"role": "assistant", "content": "1 2 3"},
        ],
        "2-turn": [
            {"role": "user", "content": "Sort: 3 1 2"},
            {"role": "assistant", "content": "1 2 3"},
            {"role": "user", "content": "Reverse: a b c"},
            {"role": "assistant", "content": "c b a"},
        ],
        "system+1-turn": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Reverse: q b x"},
            {"role": "assistant", "content": "x b q"},
        ],
    }
    for name, msgs in convs.items():
        full = tok.apply_chat_template(msgs, tokenize=False)
        prompt = tok.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
        assert full.startswith(prompt), (name, prompt, full)
        completion = full[len(prompt):]
        expected = " " + msgs[-1]["content"] + tok.eos_token
        assert completion == expected, (name, completion, expected)
        # Token level: prompt ids must be a prefix of the full ids too.
        full_ids = tok(full, add_special_tokens=False)["input_ids"]
        prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        assert full_ids[: len(prompt_ids)] == prompt_ids, (name, prompt_ids, full_ids)
        assert full_ids[0] == tok.bos_token_id and full_ids[-1] == tok.eos_token_id
        print(f"[prefix ok] {name}: prompt={prompt!r} completion={completion!r} "
              f"({len(prompt_ids)} + {len(full_ids) - len(prompt_ids)} tokens)")


def show(tok, texts: list[str]) -> None:
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        pieces = tok.convert_ids_to_tokens(ids)
        assert tok.decode(ids) == text, (text, tok.decode(ids))
        print(f"  {text!r} -> {len(ids)} tokens {pieces} {ids}")


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    t_start = time.perf_counter()
    texts, n_files, n_bytes = stdlib_corpus()
    demo = demo_corpus()
    t_read = time.perf_counter()
    print(f"corpus: {n_files} stdlib files, {n_bytes / 1e6:.2f} MB "
          f"+ {len(demo)} demo blocks ({t_read - t_start:.2f}s)")

    backend = train_backend(texts + demo)
    t_train = time.perf_counter()
    print(f"trained BPE: vocab {backend.get_vocab_size()} ({t_train - t_read:.2f}s)")

    tok = wrap(backend)
    for i, sp in enumerate(SPECIAL_TOKENS):
        assert tok.convert_tokens_to_ids(sp) == i, (sp, tok.convert_tokens_to_ids(sp))
    check_prefix_property(tok)

    # Save into a fresh directory so stale files never linger.
    out = args.out_dir
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    tok.save_pretrained(out)

    # Reload the saved files the way users will and re-check everything.
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(str(out))
    assert len(loaded) == VOCAB_SIZE, len(loaded)
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (0, 1, 2)
    assert loaded.model_max_length == 4096 and loaded.padding_side == "right"
    assert loaded.chat_template == CHAT_TEMPLATE
    check_prefix_property(loaded)
    for ch in string.digits + string.ascii_lowercase:
        ids = loaded(" " + ch, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, (ch, ids)
    print("every ' <digit>' and ' <lowercase letter>' is a single token")
    print(f"reloaded {type(loaded).__name__}: len {len(loaded)}, "
          f"pad/bos/eos ids {loaded.pad_token_id}/{loaded.bos_token_id}/{loaded.eos_token_id}")
    print("sample tokenizations:")
    show(
        loaded,
        [
            "Sort: 3 1 2",
            "Sort: 3 9 1 4",
            "1 3 4 9",
            "Reverse: q b x",
            "x b q",
            "User: Sort: 0 5 5 7 2\nAssistant: 0 2 5 5 7",
            "def main():\n    return 42\n",
        ],
    )
    ex = [
        {"role": "user", "content": "Sort: 3 9 1 4"},
        {"role": "assistant", "content": "1 3 4 9"},
    ]
    ids = loaded.apply_chat_template(ex, tokenize=True, return_dict=False)
    print(f"  chat example -> {len(ids)} tokens {loaded.convert_ids_to_tokens(ids)}")

    for p in sorted(out.iterdir()):
        print(f"  {p.relative_to(REPO_ROOT) if p.is_relative_to(REPO_ROOT) else p}: {p.stat().st_size} bytes")
    size = dir_size(out)
    print(f"tokenizer dir: {size} bytes")
    assert size < 400_000, size
    print(f"done in {time.perf_counter() - t_start:.2f}s")


if __name__ == "__main__":
    main()
