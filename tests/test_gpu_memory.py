"""The GPU memory plan on a GPU: what a training step of peftkit's own loop measures
(`torch.cuda.max_memory_allocated`, result.json) against `peftkit show`'s estimate, for bf16
LoRA and NF4 QLoRA with and without upcast weights and activation offloading.

Marked gpu and skipped without CUDA: scripts/gpu_check.py runs them on a lent GPU
(docs/qlora-and-memory.md). On CPU, tests/test_memory.py checks the same estimate against
the peak of live tensors.
"""

import json
from pathlib import Path

import pytest
import torch

from peftkit.model import memory
from peftkit.model.tiny import build_random
from peftkit.recipe import registry
from peftkit.recipe.overrides import apply_overrides
from peftkit.training.loop import train

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
              pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing")]

TOKENS = 2048  # per sample; micro-batches of 2 samples
WORDS = "the quick brown fox jumps over a lazy dog while numbers sort and lists reverse".split()


@pytest.fixture(scope="module")
def mid_model(tmp_path_factory) -> str:
    """A 4-layer Llama with Llama-3.2-1B's layer shape and a 32k vocabulary, random weights."""
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=4,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                         vocab_size=32000, tie_word_embeddings=False)
    return str(build_random(config, tmp_path_factory.mktemp("mid") / "model", "cuda"))


@pytest.fixture(scope="module")
def long_text(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("data") / "text.jsonl"
    rows = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(3 * TOKENS))
            for i in range(8)]
    path.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    return str(path)


def run(tmp_path, model: str, data: str, recipe: str, *overrides) -> dict:
    recipe_ = apply_overrides(registry.resolve(recipe).recipe, [
        f"model.name={model}", "model.arch=llama", f"data.train={data}", "data.format=text",
        f"data.max_len={TOKENS}", "data.eval_size=0", "train.batch_size=2",
        "train.grad_accum=1", "train.max_steps=2", "train.warmup_steps=0",
        "train.forgetting=false",
        f"train.output_dir={tmp_path}", *overrides])
    result = train(recipe_, overwrite=True)
    torch.cuda.empty_cache()
    return json.loads((Path(result.path) / "result.json").read_text())["memory"]


@pytest.mark.parametrize("recipe, overrides", [
    ("llama3-8b-lora", ()),
    ("llama3-8b-qlora", ()),
    ("llama3-8b-qlora", ("model.upcast_unquantized=true",)),
    ("llama3-8b-qlora", ("train.offload_activations=true",)),
], ids=["lora", "qlora", "qlora-upcast", "qlora-offload"])
def test_cuda_peak_is_within_15pct_of_the_estimate(tmp_path, mid_model, long_text, recipe,
                                                   overrides):
    if "qlora" in recipe:
        pytest.importorskip("bitsandbytes")
    mem = run(tmp_path, mid_model, long_text, recipe, *overrides)
    ratio = mem["measured_over_estimate"]
    assert 0.85 <= ratio <= 1.15, (ratio, mem["estimate"]["parts_bytes"],
                                   memory.human(mem["measured"]["above_baseline_bytes"]))


def test_offloading_lowers_the_cuda_peak_by_the_checkpointed_activations(tmp_path, mid_model,
                                                                        long_text):
    pytest.importorskip("bitsandbytes")
    kept = run(tmp_path / "kept", mid_model, long_text, "llama3-8b-qlora")
    moved = run(tmp_path / "moved", mid_model, long_text, "llama3-8b-qlora",
                "train.offload_activations=true")
    saved = kept["measured"]["above_baseline_bytes"] - moved["measured"]["above_baseline_bytes"]
    expected = moved["estimate"]["offloaded_bytes"] - moved["estimate"]["parts_bytes"][
        "activations"]
    assert saved == pytest.approx(expected, rel=0.3), (memory.human(saved),
                                                       memory.human(expected))


def test_a_4bit_base_on_cuda_keeps_its_other_weights_in_bf16(mid_model):
    bnb = pytest.importorskip("bitsandbytes")
    from peftkit.model.loading import load_model, prepare_for_training

    model = apply_overrides(registry.resolve("llama3-8b-qlora").recipe,
                            [f"model.name={mid_model}"]).model
    base = prepare_for_training(load_model(mid_model, model, torch.bfloat16, torch.bfloat16,
                                           torch.device("cuda", 0)), model, True)
    dtypes = {p.dtype for p in base.parameters() if not isinstance(p, bnb.nn.Params4bit)}
    assert dtypes == {torch.bfloat16} and not any(p.requires_grad for p in base.parameters())
