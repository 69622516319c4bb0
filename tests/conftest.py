"""Shared test fixtures. Tests run offline: the Hugging Face Hub is never contacted."""

import atexit
import os
import shutil
import tempfile

# Set before anything imports huggingface_hub / datasets, which read these at import time:
# offline mode (a Hub lookup fails at once instead of retrying for ~25 s) and throwaway caches.
_HF_HOME = tempfile.mkdtemp(prefix="peftkit-test-hf-")
atexit.register(shutil.rmtree, _HF_HOME, ignore_errors=True)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HOME"] = _HF_HOME
os.environ["HF_DATASETS_CACHE"] = os.path.join(_HF_HOME, "datasets")
# Tiny models are built once per test session into a throwaway cache.
os.environ["PEFTKIT_CACHE"] = os.path.join(_HF_HOME, "peftkit")

import pytest  # noqa: E402

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}System: {{ m['content'] }}\n"
    "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n"
    "{% elif m['role'] == 'assistant' %}Assistant: {{ m['content'] }}{{ eos_token }}\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def _training_text() -> list[str]:
    words = ("the quick brown fox jumps over a lazy dog while User Assistant System asks "
             "answers sort reverse list numbers hello world question instruction output "
             "input prompt completion text model learns").split()
    lines = []
    for i in range(400):
        picked = " ".join(words[(i * 7 + k * 3) % len(words)] for k in range(8))
        lines.append(f"User: {picked} {i % 97} {i * 13 % 1000}\nAssistant: {picked[::-1]}")
    return lines


@pytest.fixture(scope="session")
def bpe_tokenizer():
    """A small byte-level BPE tokenizer (vocab ~500) trained in-test, with pad/bos/eos =
    0/1/2 and a simple chat template that puts a newline after each assistant EOS."""
    return make_bpe_tokenizer()


def make_bpe_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500,
                                  special_tokens=["<|pad|>", "<|bos|>", "<|eos|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(_training_text(), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<|pad|>",
                                        bos_token="<|bos|>", eos_token="<|eos|>",
                                        chat_template=CHAT_TEMPLATE)
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    return tokenizer


@pytest.fixture(scope="session")
def alpaca_file(tmp_path_factory):
    """The demo task as alpaca rows: stands in for Hub datasets the real recipes name."""
    import json

    from peftkit.data.sources import resolve_source

    path = tmp_path_factory.mktemp("data") / "alpaca.jsonl"
    rows = []
    with open(resolve_source("peftkit:data/sort_reverse/train.jsonl")) as f:
        for line in list(f)[:600]:
            user, answer = json.loads(line)["messages"]
            rows.append({"instruction": user["content"], "input": "", "output": answer["content"]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)
