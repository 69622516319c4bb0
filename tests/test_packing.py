"""Packed (padding-free) batches: each sample's loss and gradients are those it has alone."""

import pytest
import torch

from peftkit.data import packing
from peftkit.data.batching import collate, loss_tokens
from peftkit.recipe import Lora, Model
from peftkit.data.example import IGNORE, Example
from peftkit.model.head_loss import head_loss
from peftkit.training.loss import TokenLoss
from peftkit.model.loading import attach_adapter, base_path, load_model
from peftkit.model.tiny import SUPPORTED_ARCHS

LENGTHS = (7, 12, 12, 5, 30)  # 12, 12: a run of equal lengths, attended in one batched call


def make_examples(lengths=LENGTHS, seed=0) -> list[Example]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, 4000, (n,), generator=gen).tolist()
        out.append(Example(ids, [IGNORE] * 3 + ids[3:]))  # a 3-token prompt
    return out


def lora_model(arch: str, packed: bool = True, **config):
    """A tiny base with a LoRA adapter whose B is non-zero (so the adapter matters)."""
    spec = Model(f"tiny/{arch}", arch=arch, tiny=True)
    if config:
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(base_path(spec), **config)
        base.config.use_cache = False
    else:
        base = load_model(base_path(spec), spec, torch.float32)
    enabled, _ = packing.enable(base, packed)
    model = attach_adapter(base, Lora(r=4, dropout=0.0))
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model, enabled


def only(examples: list[Example], keep: int) -> list[Example]:
    """The same samples, with loss only on sample `keep`."""
    return [e if i == keep else Example(e.input_ids, [IGNORE] * len(e.labels))
            for i, e in enumerate(examples)]


def per_sample_losses(loss: TokenLoss, examples: list[Example], packed: bool) -> list[float]:
    out = []
    for i, e in enumerate(examples):
        if packed:
            total, count = loss(**packing.collate_packed(only(examples, i)))
        else:
            total, count = loss(**collate([e], pad_id=0))
        out.append((total / count).item())
    return out


def lora_grads(model) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("arch", [a for a in SUPPORTED_ARCHS if a != "gemma2"])
def test_packed_row_gives_each_sample_its_loss_alone(arch):
    model, enabled = lora_model(arch)
    assert enabled
    loss, examples = TokenLoss(model), make_examples()
    with torch.no_grad():
        alone = per_sample_losses(loss, examples, packed=False)
        packed = per_sample_losses(loss, examples, packed=True)
    assert packed == pytest.approx(alone, rel=1e-5, abs=1e-5)


def test_packed_gradients_equal_the_sum_of_samples_alone_with_checkpointing():
    model, _ = lora_model("llama")
    model.get_base_model().gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    loss, examples = TokenLoss(model), make_examples()
    for e in examples:
        total, _ = loss(**collate([e], pad_id=0))
        total.backward()
    expected = lora_grads(model)
    total, count = loss(**packing.collate_packed(examples))
    total.backward()
    got = lora_grads(model)
    assert count.item() == loss_tokens(examples)
    assert expected.keys() == got.keys() and len(got) > 0
    for name in expected:  # relative to the gradient's size: fp32 summation order differs
        error = (got[name] - expected[name]).norm() / expected[name].norm()
        assert error < 1e-5, (name, error)


def test_without_isolation_samples_would_attend_to_each_other():
    """The control that gives the tests above their teeth: the same packed row under plain
    SDPA (which ignores the sample boundaries) changes every sample after the first."""
    model, _ = lora_model("llama")
    model.get_base_model().set_attn_implementation("sdpa")
    loss, examples = TokenLoss(model), make_examples()
    with torch.no_grad():
        alone = per_sample_losses(loss, examples, packed=False)
        leaky = per_sample_losses(loss, examples, packed=True)
    assert leaky[0] == pytest.approx(alone[0], rel=1e-5)
    assert all(abs(a - b) > 1e-3 for a, b in zip(alone[1:], leaky[1:])), (alone, leaky)


def test_sliding_window_is_kept_inside_packed_samples():
    model, enabled = lora_model("mistral", sliding_window=6)
    assert enabled
    loss, examples = TokenLoss(model), make_examples()
    with torch.no_grad():
        alone = per_sample_losses(loss, examples, packed=False)
        packed = per_sample_losses(loss, examples, packed=True)
    assert packed == pytest.approx(alone, rel=1e-5, abs=1e-5)


def test_padded_batches_and_generation_are_plain_sdpa():
    """The registered kernel must not change anything for batches that are not packed
    (evaluation, left-padded generation)."""
    model, _ = lora_model("llama")
    ids = torch.randint(3, 4000, (2, 10), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    base = model.get_base_model()
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask).logits
        base.set_attn_implementation("sdpa")
        plain = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(ours, plain, rtol=0, atol=1e-6)


def test_unsupported_attention_falls_back_to_padding_with_a_note():
    spec = Model("tiny/gemma2", arch="gemma2", tiny=True)
    enabled, note = packing.enable(load_model(base_path(spec), spec, torch.float32), True)
    assert not enabled and "padded batches" in note
    spec = Model("tiny/llama", arch="llama", tiny=True)
    assert packing.enable(load_model(base_path(spec), spec, torch.float32), False) == (False, None)


def test_collate_packed_layout():
    examples = make_examples((4, 3, 5))
    batch = packing.collate_packed(examples)
    assert batch["input_ids"].shape == (1, 12)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 4, 7, 12]
    assert batch["max_length_q"] == 5
    labels = batch["labels"][0]
    assert labels[[0, 4, 7]].tolist() == [IGNORE] * 3  # no sample predicts the next one's start
    assert int((batch["labels"][:, 1:] != IGNORE).sum()) == loss_tokens(examples)


def test_training_packed_and_compiled_equals_training_padded(tmp_path):
    import json

    from peftkit.recipe import registry
    from peftkit.recipe.overrides import apply_overrides
    from peftkit.training.loop import train

    def run(path, *overrides):
        entry = registry.resolve("tiny-demo")
        recipe = apply_overrides(entry.recipe, [
            "model.tiny_size=xs", "data.max_samples=64", "data.eval=", "data.eval_size=0",
            "train.max_steps=3", "train.batch_size=8", "train.warmup_steps=0",
            "train.eval_generate=0", "train.log_every=1", f"train.output_dir={path}",
            *overrides])
        result = train(recipe, str(entry.path))
        metrics = (result.path / "metrics.jsonl").read_text().splitlines()
        return result, [r["loss"] for r in map(json.loads, metrics) if "loss" in r]

    padded, padded_losses = run(tmp_path / "a", "data.packing=false")
    packed, packed_losses = run(tmp_path / "b", "data.packing=true")
    assert len(packed_losses) == 3
    assert packed_losses == pytest.approx(padded_losses, rel=1e-5)
    a, b = (dict((n, p.detach()) for n, p in r.model.named_parameters() if p.requires_grad)
            for r in (padded, packed))
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6)
    # train.compile: the same training steps through inductor-compiled decoder layers.
    compiled, compiled_losses = run(tmp_path / "c", "data.packing=true", "train.compile=true")
    assert compiled_losses == pytest.approx(packed_losses, rel=1e-5)
    layers = compiled.model.get_base_model().model.layers
    assert all(layer._compiled_call_impl is not None for layer in layers)


# --- the chunked LM head --------------------------------------------------------------------

def _head_case(trainable: bool):
    gen = torch.Generator().manual_seed(3)
    head = torch.nn.Linear(16, 50, bias=False)
    head.weight.data = torch.randn(50, 16, generator=gen)
    head.weight.requires_grad_(trainable)
    hidden = torch.randn(37, 16, generator=gen, requires_grad=True)
    targets = torch.randint(0, 50, (37,), generator=gen)
    return head, hidden, targets


@pytest.mark.parametrize("trainable,softcap", [(False, None), (True, None), (False, 5.0)])
def test_chunked_head_loss_equals_full_logits(trainable, softcap):
    head, hidden, targets = _head_case(trainable)
    full = head_loss(head, hidden, targets, softcap, chunk_logits=10 ** 9)  # one chunk
    grads = torch.autograd.grad(full, [hidden] + ([head.weight] if trainable else []))
    chunked = head_loss(head, hidden, targets, softcap, chunk_logits=50 * 8)  # 5 chunks
    chunked_grads = torch.autograd.grad(chunked, [hidden] + ([head.weight] if trainable else []))
    torch.testing.assert_close(chunked, full, rtol=1e-6, atol=1e-5)
    for a, b in zip(chunked_grads, grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
