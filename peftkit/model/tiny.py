"""Tiny, random-weight stand-ins for Hub models, built offline.

A tiny form keeps the architecture class of the real model (LlamaForCausalLM, Qwen2ForCausalLM,
...) and scales its dimensions down, with peftkit's own byte-level BPE tokenizer. It is saved
as a plain transformers model directory in the cache, so adapters trained on it load with
`AutoModelForCausalLM.from_pretrained(path)` and no peftkit. Weights come from a fixed seed:
deleting the cache and rebuilding gives the same model bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

from peftkit.errors import UserError
from peftkit.model.sharded import name_cpu_for_deepspeed, plain_construction, quiet_progress

# Dimensions per size. Heads divide hidden; kv heads divide heads (exercises GQA).
SIZES = {
    "xs": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2),
    "s": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=4),
    # Benchmarks: ~42M matmul parameters, and a 32k vocabulary so that the LM head and the
    # cross-entropy weigh what they do in real models. The tokenizer has 4096 tokens: rows
    # 4096.. of the embeddings and head are never looked up nor a target, but the softmax
    # spans all 32000 (harmless; generation could emit ids the tokenizer cannot decode).
    "m": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
              num_attention_heads=8, num_key_value_heads=8, vocab_size=32000),
}

# Known name prefixes -> transformers model_type, for recipes that leave model.arch empty.
KNOWN_ARCHS = {
    "meta-llama/": "llama", "qwen/qwen2": "qwen2", "qwen/qwen3": "qwen3",
    "mistralai/": "mistral", "google/gemma-2": "gemma2", "microsoft/phi-3": "phi3",
    "microsoft/phi-4": "phi3",
}
SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "phi3")
BUILD_VERSION = 1  # bump when the way tiny models are built changes


def cache_root() -> Path:
    return Path(os.environ.get("PEFTKIT_CACHE", Path.home() / ".cache" / "peftkit"))


def tokenizer_dir() -> Path:
    return Path(str(resources.files("peftkit") / "assets" / "tokenizer"))


def infer_arch(name: str, arch: str) -> str:
    if arch:
        return arch
    for prefix, model_type in KNOWN_ARCHS.items():
        if name.lower().startswith(prefix):
            return model_type
    return ""


def tiny_config(arch: str, size: str, vocab_size: int, special: dict):
    """A transformers config of `arch` at tiny `size`."""
    from transformers import AutoConfig

    if arch not in SUPPORTED_ARCHS:
        raise UserError(f"model.arch={arch!r}: no tiny form for this architecture; "
                        f"use one of {', '.join(SUPPORTED_ARCHS)}")
    dims = dict(SIZES[size])
    dims["head_dim"] = dims["hidden_size"] // dims["num_attention_heads"]
    vocab_size = max(vocab_size, dims.pop("vocab_size", 0))
    return AutoConfig.for_model(
        arch, vocab_size=vocab_size, max_position_embeddings=4096, tie_word_embeddings=False,
        rope_theta=10000.0, **dims, **special)


def build_tiny(name: str, arch: str, size: str) -> Path:
    """Return the directory of the tiny form of `name`, building it on first use."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import torch


    arch = infer_arch(name, arch)
    if not arch:
        raise UserError(f"model.arch is empty and {name!r} is not a known model; set "
                        f"model.arch to one of {', '.join(SUPPORTED_ARCHS)}")
    tok_dir = tokenizer_dir()
    tok_hash = hashlib.sha256((tok_dir / "tokenizer.json").read_bytes()).hexdigest()[:8]
    key = json.dumps([BUILD_VERSION, arch, size, tok_hash], sort_keys=True)
    slug = name.replace("/", "--").lower()
    target = cache_root() / "tiny" / f"{slug}-{size}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"
    if (target / "config.json").is_file():
        return target

    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    config = tiny_config(arch, size, len(tokenizer), special)
    # Same weights every time, whatever the caller's RNG state.
    with torch.random.fork_rng(devices=[]), plain_construction():  # whole, even under ZeRO-3
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build under a temporary name and rename: concurrent builders (DDP ranks) cannot see
    # a half-written model; the loser of the race discards its copy.
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".building-"))
    name_cpu_for_deepspeed()  # saving imports DeepSpeed (when installed), which guesses aloud
    try:
        with quiet_progress():  # a tiny model saves in milliseconds
            model.save_pretrained(tmp)
        if not (tmp / "config.json").is_file():  # transformers saves on global rank 0 only
            raise RuntimeError("tiny models must be built by the main process first")
        tokenizer.save_pretrained(tmp)
        (tmp / "peftkit_tiny.json").write_text(json.dumps(
            {"stands_in_for": name, "arch": arch, "size": size, "seed": 0}, indent=2))
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def build_random(config, target: Path, device: str = "cpu", dtype: str = "bfloat16") -> Path:
    """A random-weight model of any shape (`config`, e.g. `shapes.known_config(name)`) saved
    to `target` with peftkit's tokenizer: full-size stand-ins for memory and speed checks
    (scripts/gpu_check.py builds Llama-3.2-1B and -3.1-8B shapes on the GPU, where random
    initialisation of 8B weights takes seconds). Rows of the embeddings and head past the
    tokenizer's 4096 tokens are never looked up, as in the tiny "m" size."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import torch

    if (target / "config.json").is_file():
        return target
    with torch.random.fork_rng(devices=[]), torch.device(device), plain_construction():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    target.mkdir(parents=True, exist_ok=True)
    with quiet_progress():
        model.save_pretrained(target)
    AutoTokenizer.from_pretrained(tokenizer_dir()).save_pretrained(target)
    return target
