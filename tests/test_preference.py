"""Preference objectives (DPO sigmoid/IPO, ORPO): loss and gradients equal TRL 1.16's formulas
on identical batches, the reference is the base with the adapter disabled (or the starting
adapter), pairs never see each other, only adapter weights change, bad input is one line."""

from __future__ import annotations

import json
import math
import re
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from peftkit.cli.app import main
from peftkit.data import preference as preference_data
from peftkit.data.sources import BadRow, Row, load_records, resolve_source
from peftkit.errors import ConfigError, UserError
from peftkit.export.merge import merge_run
from peftkit.model.loading import attach_adapter, base_path, load_model, load_tokenizer
from peftkit.recipe import Data, Lora, Model, registry
from peftkit.recipe.overrides import apply_overrides
from peftkit.recipe.validate import problems_of
from peftkit.training import preference
from peftkit.training.loop import train

trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")  # the reference implementation
from trl.experimental.orpo.orpo_trainer import ORPOTrainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes" / "demo_dpo.py")  # by path: the checkout's, not an install's
PAIRS = "peftkit:data/sort_reverse_pairs/train.jsonl"
HELD_OUT = "peftkit:data/sort_reverse_pairs/test.jsonl"
TOL = 1e-5


# --- a tiny model with a non-zero adapter, and pair batches ---------------------------------

@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model_cfg = Model("peftkit/tiny-llama-demo", arch="llama", tiny=True, tiny_size="xs")
    base = base_path(model_cfg)
    tokenizer, _ = load_tokenizer(base, model_cfg)
    peft_model = attach_adapter(load_model(base, model_cfg, torch.float32),
                                Lora(r=8, dropout=0.0, targets="all-linear"))
    with torch.no_grad():  # B = 0 would make the policy the reference: perturb it
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
    rows = load_records(PAIRS)[0][:12] + load_records(HELD_OUT)[0][:4]  # both shapes
    pairs, _ = preference_data.encode_pairs(rows, tokenizer, Data(max_len=64))
    return types.SimpleNamespace(model=peft_model, tokenizer=tokenizer, pairs=pairs)


def batch_of(t, pairs):
    return preference.collate_pairs(pairs, t.tokenizer.pad_token_id)


def trl_logps(model, batch, average=False):
    """Log-probs as TRL computes them: full logits, then its get_batch_logps."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return ORPOTrainer.get_batch_logps(logits, batch["labels"], average_log_prob=average)


def trl_dpo_loss(chosen, rejected, ref_c, ref_r, beta, loss_type, n_c, n_r):
    """TRL 1.16 DPOTrainer._compute_loss, reverse-KL branch (dpo_trainer.py, 'sigmoid' and
    'ipo'): the method itself needs a whole trainer, so its formulas are restated here."""
    chosen_scores, rejected_scores = chosen - ref_c, rejected - ref_r
    if loss_type == "sigmoid":
        per_sequence_loss = -F.logsigmoid(beta * (chosen_scores - rejected_scores))
    else:
        ipo_delta = chosen_scores / n_c.clamp(min=1.0) - rejected_scores / n_r.clamp(min=1.0)
        per_sequence_loss = (ipo_delta - 1 / (2 * beta)) ** 2
    return per_sequence_loss.mean()


def grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max((a[k] - b[k]).abs().max().item() for k in a)


# --- equality with TRL ------------------------------------------------------------------------

@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_loss_and_grads_equal_trl(tiny, loss_type):
    pairs = tiny.pairs[:6]
    preference.fill_reference(_cpu_accelerator(), tiny.model, pairs, 4,
                              tiny.tokenizer.pad_token_id, adapter_is_reference=False)
    batch = batch_of(tiny, pairs)
    ours = preference.PreferenceLoss(tiny.model, "dpo", 0.3, loss_type)
    total, n = ours(**batch)
    our_loss = total / n
    our_grads = grads(tiny.model, our_loss)

    with torch.no_grad(), tiny.model.disable_adapter():
        ref = trl_logps(tiny.model, batch)
    logps = trl_logps(tiny.model, batch)
    n_tokens = (batch["labels"][:, 1:] != -100).sum(1).float()
    k = len(pairs)
    trl_loss = trl_dpo_loss(logps[:k], logps[k:], ref[:k], ref[k:], 0.3, loss_type,
                            n_tokens[:k], n_tokens[k:])
    trl_grads = grads(tiny.model, trl_loss)
    loss_diff, grad_diff = abs(our_loss.item() - trl_loss.item()), max_diff(our_grads, trl_grads)
    print(f"dpo {loss_type}: |loss diff| {loss_diff:.2e}, max |grad diff| {grad_diff:.2e}")
    assert loss_diff < TOL and grad_diff < TOL
    assert our_loss.item() != pytest.approx(math.log(2), abs=1e-3)  # a case that can fail


def test_orpo_loss_and_grads_equal_trl(tiny):
    batch, k, lam = batch_of(tiny, tiny.pairs[:6]), 6, 0.25
    ours = preference.PreferenceLoss(tiny.model, "orpo", 0.1, orpo_lambda=lam)
    total, n = ours(**batch)
    our_grads = grads(tiny.model, total / n)

    # TRL's own odds_ratio_loss (its `self` only supplies beta and a device), on TRL's
    # length-averaged log-probs; the next-token term on the chosen responses, as peftkit
    # scores them (TRL's concatenated_forward also counts the prompt tokens there).
    fake_self = types.SimpleNamespace(beta=lam, accelerator=types.SimpleNamespace(device="cpu"))
    logits = tiny.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    avg = ORPOTrainer.get_batch_logps(logits, batch["labels"], average_log_prob=True)
    losses, *_ = ORPOTrainer.odds_ratio_loss(fake_self, avg[:k], avg[k:])
    nll = F.cross_entropy(logits[:k, :-1].flatten(0, 1), batch["labels"][:k, 1:].flatten())
    trl_loss = nll - losses.mean()
    trl_grads = grads(tiny.model, trl_loss)
    loss_diff = abs((total / n).item() - trl_loss.item())
    grad_diff = max_diff(our_grads, trl_grads)
    print(f"orpo: |loss diff| {loss_diff:.2e}, max |grad diff| {grad_diff:.2e}")
    assert loss_diff < TOL and grad_diff < TOL


def test_label_smoothing_is_conservative_dpo():
    delta = torch.tensor([0.5, -1.0, 2.0])
    zeros = torch.zeros(3)
    got, _, _ = preference.dpo_losses(delta, zeros, zeros, zeros, 0.5, "sigmoid", 0.2)
    want = -0.8 * F.logsigmoid(0.5 * delta) - 0.2 * F.logsigmoid(-0.5 * delta)
    assert torch.allclose(got, want)


# --- the reference, batching and padding ------------------------------------------------------

def _cpu_accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


def test_reference_logps_are_the_base_without_adapter(tiny):
    pairs = [preference_data.PreferencePair(p.chosen, p.rejected) for p in tiny.pairs[:5]]
    preference.fill_reference(_cpu_accelerator(), tiny.model, pairs, 2,
                              tiny.tokenizer.pad_token_id, adapter_is_reference=False)
    batch = batch_of(tiny, pairs)
    with torch.no_grad():
        with tiny.model.disable_adapter():
            base = trl_logps(tiny.model, batch)
        adapted = trl_logps(tiny.model, batch)
    got = torch.tensor([p.ref_chosen for p in pairs] + [p.ref_rejected for p in pairs])
    assert torch.allclose(got, base, atol=TOL)
    assert not torch.allclose(got, adapted, atol=1e-2)  # the adapter matters: not vacuous
    # With a starting adapter (model.adapter_init) the reference is that adapter as loaded.
    preference.fill_reference(_cpu_accelerator(), tiny.model, pairs, 2,
                              tiny.tokenizer.pad_token_id, adapter_is_reference=True)
    got = torch.tensor([p.ref_chosen for p in pairs] + [p.ref_rejected for p in pairs])
    assert torch.allclose(got, adapted, atol=TOL)


def test_a_pair_is_one_forward_and_padding_isolates_sequences(tiny):
    pairs = tiny.pairs[:4]
    batch = batch_of(tiny, pairs)
    assert len(set(batch["attention_mask"].sum(1).tolist())) > 1  # really padded
    calls = []
    hook = tiny.model.get_base_model().get_decoder().register_forward_hook(
        lambda module, args, kwargs, out: calls.append(kwargs["input_ids"].shape[0]),
        with_kwargs=True)
    try:
        with torch.no_grad():
            together, _ = preference.sequence_logps(tiny.model, batch["input_ids"],
                                                    batch["attention_mask"], batch["labels"])
    finally:
        hook.remove()
    assert calls == [2 * len(pairs)]  # chosen and rejected of every pair: one forward
    examples = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    for row, example in enumerate(examples):
        ids = torch.tensor([example.input_ids])
        with torch.no_grad():
            alone, _ = preference.sequence_logps(tiny.model, ids, torch.ones_like(ids),
                                                 torch.tensor([example.labels]))
        assert together[row].item() == pytest.approx(alone.item(), abs=TOL)


# --- data shapes --------------------------------------------------------------------------------

def _pair(tokenizer, record):
    pairs, stats = preference_data.encode_pairs([Row(record, "x.jsonl:1")], tokenizer,
                                                Data(max_len=128))
    return pairs[0]


def _response(example, tokenizer):
    return tokenizer.decode([t for t, lab in zip(example.input_ids, example.labels)
                             if lab != -100])


@pytest.mark.parametrize("record", [
    {"prompt": "Sort: 3 1", "chosen": "1 3", "rejected": "3 1"},
    {"prompt": [{"role": "user", "content": "Sort: 3 1"}],
     "chosen": [{"role": "assistant", "content": "1 3"}],
     "rejected": [{"role": "assistant", "content": "3 1"}]},
    {"prompt": "Sort: 3 1",  # ultrafeedback_binarized: the conversation repeats the prompt
     "chosen": [{"role": "user", "content": "Sort: 3 1"}, {"role": "assistant", "content": "1 3"}],
     "rejected": [{"role": "user", "content": "Sort: 3 1"},
                  {"role": "assistant", "content": "3 1"}]},
    {"chosen": [{"role": "user", "content": "Sort: 3 1"}, {"role": "assistant", "content": "1 3"}],
     "rejected": [{"role": "user", "content": "Sort: 3 1"},
                  {"role": "assistant", "content": "3 1"}]},  # implicit prompt
], ids=["strings", "conversational", "ultrafeedback", "implicit-prompt"])
def test_every_preference_shape_renders_the_same_pair(bpe_tokenizer, record):
    pair = _pair(bpe_tokenizer, record)
    want = _pair(bpe_tokenizer, {"prompt": "Sort: 3 1", "chosen": "1 3", "rejected": "3 1"})
    assert (pair.chosen, pair.rejected) == (want.chosen, want.rejected)
    # Loss only on the responses (through EOS); the prompt tokens are shared.
    assert _response(pair.chosen, bpe_tokenizer).strip() == "1 3<|eos|>"
    assert _response(pair.rejected, bpe_tokenizer).strip() == "3 1<|eos|>"
    first = pair.chosen.labels.index(next(x for x in pair.chosen.labels if x != -100))
    assert pair.chosen.input_ids[:first] == pair.rejected.input_ids[:first]


def test_earlier_assistant_turns_of_a_prompt_carry_no_loss(bpe_tokenizer):
    prompt = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"},
              {"role": "user", "content": "Sort: 3 1"}]
    pair = _pair(bpe_tokenizer, {"prompt": prompt, "chosen": "1 3", "rejected": "3 1"})
    assert _response(pair.chosen, bpe_tokenizer).strip() == "1 3<|eos|>"


def test_bad_rows_name_file_and_line_or_are_skipped_and_counted(bpe_tokenizer):
    rows = [Row({"prompt": "a", "chosen": "b", "rejected": "c"}, "p.jsonl:1"),
            Row({"prompt": "a", "chosen": "b"}, "p.jsonl:2"),
            Row({"prompt": "a", "chosen": 3, "rejected": "c"}, "p.jsonl:3")]
    with pytest.raises(BadRow, match=r"p.jsonl:2: missing 'rejected'"):
        preference_data.encode_pairs(rows, bpe_tokenizer, Data())
    pairs, stats = preference_data.encode_pairs(rows, bpe_tokenizer, Data(skip_bad_rows=True))
    assert (len(pairs), stats.skipped) == (1, 2)


# --- recipes: validation all at once ------------------------------------------------------------

def test_preference_settings_are_validated_together():
    entry = registry.resolve(RECIPE)
    with pytest.raises(ConfigError) as err:
        apply_overrides(entry.recipe, ["train.beta=0", "train.dpo_loss=ipo",
                                       "train.label_smoothing=0.1", "data.format=chat",
                                       "train.orpo_lambda=-1", "adapter.init=pissa"])
    text = str(err.value)
    for key in ("train.beta", "train.label_smoothing", "data.format", "train.orpo_lambda",
                "adapter.init"):
        assert key in text, key
    assert not problems_of(entry.recipe)


# --- end to end ---------------------------------------------------------------------------------

TINY = ["model.tiny_size=xs", "data.max_samples=64", "train.batch_size=8", "train.lr=5e-3",
        "train.warmup_steps=0", "train.log_every=1", "train.eval_every=0",
        "data.eval_size=0", "train.scheduler=constant"]


def run(tmp_path, *overrides, recipe=RECIPE, **kwargs):
    entry = registry.resolve(recipe)
    cfg = apply_overrides(entry.recipe, [*TINY, f"train.output_dir={tmp_path}", *overrides])
    return train(cfg, str(entry.path), **kwargs)


def metrics(path) -> list[dict]:
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def test_shipped_dpo_recipe_trains_in_tiny_form(tmp_path):
    result = run(tmp_path, "train.max_steps=8")
    before, after = result.evals["before"], result.evals["after"]
    assert before["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy = reference
    assert after["eval_loss"] < before["eval_loss"]
    assert after["preference_accuracy"] > before["preference_accuracy"]
    steps = [r for r in metrics(result.path) if "loss" in r]
    assert {"rewards_chosen", "rewards_rejected", "reward_margin",
            "preference_accuracy"} <= steps[-1].keys()
    assert "preference_accuracy" in (result.path / "README.md").read_text()
    # The merge is verified, against the probe loss training recorded too.
    report = merge_run(result.path, tmp_path / "merged")
    assert {c["name"] for c in report["checks"]} >= {"as trained"}
    assert all(c["ok"] for c in report["checks"]), report["checks"]
    # Only adapter weights changed: the frozen base equals a fresh load of it.
    model_cfg = Model("peftkit/tiny-llama-demo", arch="llama", tiny=True, tiny_size="xs")
    fresh = load_model(base_path(model_cfg), model_cfg, torch.float32).state_dict()
    for name, tensor in result.model.get_base_model().state_dict().items():
        if "lora_" in name or "modules_to_save" in name:
            continue
        key = re.sub(r"\.base_layer|\.original_module", "", name)
        assert torch.equal(tensor, fresh[key]), name


@pytest.mark.parametrize("recipe", ["smollm2_135m_dpo", "smollm2_135m_orpo"])
def test_real_model_preference_recipes_run_in_tiny_form(tmp_path, recipe):
    """smollm2-135m-dpo and -orpo (the real model; docs/preference.md) in their tiny form: the
    pairs carry the system prompt, and a run from the base trains and scores held-out pairs."""
    entry = registry.resolve(str(ROOT / "recipes" / f"{recipe}.py"))
    cfg = apply_overrides(entry.recipe, ["model.tiny=true", "model.tiny_size=xs",
                                         "train.max_steps=2", "train.warmup_steps=0",
                                         "train.eval_every=0", f"train.output_dir={tmp_path}"])
    tokenizer, _ = load_tokenizer(base_path(cfg.model), cfg.model)
    pairs, _ = preference_data.encode_pairs(load_records(cfg.data.train)[0][:1], tokenizer,
                                            cfg.data)
    assert cfg.data.system_prompt in tokenizer.decode(pairs[0].chosen.input_ids)
    result = train(cfg, str(entry.path))
    assert result.steps == 2
    if cfg.train.objective == "dpo":  # the policy starts as its reference
        assert result.evals["before"]["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert math.isfinite(result.evals["after"]["eval_loss"])
    assert "preference_accuracy" in result.evals["after"]
    assert (result.path / "adapter" / "adapter_model.safetensors").is_file()


def test_capitals_pairs_prefer_the_city_name_only():
    """The real-model preference set: chosen = the capital alone, rejected = something else the
    base said; held-out pairs are the SFT demo's held-out countries, none of them in train."""
    def qa(split):  # the SFT demo's rows: question -> capital
        lines = open(resolve_source(f"peftkit:data/capitals/{split}.jsonl"), encoding="utf-8")
        return {m[0]["content"]: m[1]["content"] for m in
                (json.loads(line)["messages"] for line in lines)}

    train_qa, test_qa = qa("train"), qa("test")
    for split, answers in (("train", train_qa), ("test", test_qa)):
        rows = load_records(f"peftkit:data/capitals_pairs/{split}.jsonl")[0]
        assert len(rows) >= 20
        for row in rows:
            assert row["chosen"] == answers[row["prompt"]]  # the held-out split stays held out
            assert row["rejected"].removesuffix(".").lower() != row["chosen"].lower()


def test_orpo_trains(tmp_path):
    result = run(tmp_path, "train.max_steps=4", "train.objective=orpo")
    assert all(math.isfinite(r["loss"]) for r in metrics(result.path) if "loss" in r)


def test_sft_then_dpo_on_one_adapter(tmp_path):
    sft = run(tmp_path / "sft", "train.max_steps=3", "train.objective=sft",
              f"data.train={resolve_source('peftkit:data/sort_reverse/train.jsonl')}",
              "data.eval=", recipe="tiny-demo")
    start = {n: p.detach().clone() for n, p in sft.model.named_parameters() if p.requires_grad}
    dpo = run(tmp_path / "dpo", "train.max_steps=2", f"model.adapter_init={sft.path}",
              "data.eval_size=8")
    first = [r for r in metrics(dpo.path) if "loss" in r][0]
    # The reference is the SFT policy: the first step starts at log 2, zero rewards.
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert dpo.evals["before"]["reward_margin"] == pytest.approx(0, abs=1e-6)
    moved = {n: p for n, p in dpo.model.named_parameters() if p.requires_grad}
    assert moved.keys() == start.keys()
    assert any(not torch.equal(moved[n], start[n]) for n in start)


def test_dpo_resume_continues_the_same_trajectory(tmp_path):
    common = ["train.save_every=2", "data.eval_size=8"]
    straight = run(tmp_path / "a", "train.max_steps=4", *common)
    run(tmp_path / "b", "train.max_steps=2", *common)
    resumed = run(tmp_path / "b", "train.max_steps=4", *common, resume=True)
    a = [r["loss"] for r in metrics(straight.path) if "loss" in r]
    b = [r["loss"] for r in metrics(resumed.path) if "loss" in r]
    assert a == b
    for (n, p), (_, q) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(p, q), n



# --- on a QLoRA (nf4) base: bitsandbytes runs nf4 on CPU, computing in float32 ----------------

NF4 = Model("peftkit/tiny-llama-demo", arch="llama", tiny=True, tiny_size="xs", quantize="nf4")


def test_dpo_reference_on_an_nf4_base_is_that_base_without_the_adapter(tiny):
    pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    base = load_model(base_path(NF4), NF4, torch.float32, torch.float32, "cpu")
    peft_model = attach_adapter(base, Lora(r=8, dropout=0.0, targets="all-linear"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
    assert any(type(m).__name__ == "Linear4bit" for m in base.modules())
    pairs = [preference_data.PreferencePair(p.chosen, p.rejected) for p in tiny.pairs[:5]]
    preference.fill_reference(_cpu_accelerator(), peft_model, pairs, 2,
                              tiny.tokenizer.pad_token_id, adapter_is_reference=False)
    got = torch.tensor([p.ref_chosen for p in pairs] + [p.ref_rejected for p in pairs])
    batch = batch_of(tiny, pairs)
    with torch.no_grad():
        with peft_model.disable_adapter():
            quantized = trl_logps(peft_model, batch)
        adapted = trl_logps(peft_model, batch)
        with tiny.model.disable_adapter():  # the same base weights, unquantized
            unquantized = trl_logps(tiny.model, batch)
    assert torch.allclose(got, quantized, atol=TOL)
    assert not torch.allclose(got, adapted, atol=1e-2)  # the adapter was off
    assert not torch.allclose(got, unquantized, atol=1e-2)  # the 4-bit weights were used


def test_dpo_trains_an_adapter_on_an_nf4_base_and_merges(tmp_path):
    """QLoRA DPO: held-out loss falls from log 2 (the start is the reference) and preference
    accuracy rises; the quantized base (packed weights, quantization constants) and every
    other base tensor are bit-identical; `peftkit merge` takes its 4-bit path (merged into an
    unquantized copy, checked against the adapter on the nf4 base) and verifies."""
    pytest.importorskip("bitsandbytes")
    result = run(tmp_path, "train.max_steps=8", "model.quantize=nf4", "data.eval=",
                 "data.eval_size=32")
    before, after = result.evals["before"], result.evals["after"]
    assert before["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert after["eval_loss"] < before["eval_loss"]
    assert after["preference_accuracy"] > before["preference_accuracy"]
    assert after["reward_margin"] > 0
    first = [r for r in metrics(result.path) if "loss" in r][0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)

    trained = result.model.get_base_model()
    assert any(type(m).__name__ == "Linear4bit" for m in trained.modules())
    fresh = load_model(base_path(NF4), NF4, torch.float32, torch.float32, "cpu").state_dict()
    frozen = {re.sub(r"\.base_layer|\.original_module", "", k): v
              for k, v in trained.state_dict().items()
              if "lora_" not in k and "modules_to_save" not in k}
    assert frozen.keys() == fresh.keys()
    assert any(v.dtype == torch.uint8 for v in fresh.values())  # packed 4-bit weights
    for key, value in fresh.items():
        assert torch.equal(frozen[key], value), key
    moved = [n for n, p in result.model.named_parameters() if p.requires_grad]
    assert moved and all("lora_" in n or "modules_to_save" in n for n in moved)

    report = merge_run(result.path, tmp_path / "merged")
    assert report["dequantized_from"] == "nf4" and report["target"]
    assert {c["name"] for c in report["checks"]} == {"merge exact", "dequantized base",
                                                     "as trained"}
    assert all(c["ok"] for c in report["checks"]), report["checks"]

# --- bad input: one line, exit 2, nothing written ---------------------------------------------

PREF_ROW = {"prompt": "Sort: 2 1", "chosen": "1 2", "rejected": "2 1"}
SFT_ROW = {"messages": [{"role": "user", "content": "Sort: 2 1"},
                        {"role": "assistant", "content": "1 2"}]}
BASE = ["train", RECIPE, "model.tiny_size=xs", "data.train=d.jsonl", "data.eval=",
        "data.eval_size=0", "train.output_dir=runs", "train.max_steps=2", "train.warmup_steps=0",
        "train.batch_size=2"]


@pytest.mark.parametrize("rows, extra, fragment", [
    ([SFT_ROW] * 4, [], "needs pairs"),
    ([PREF_ROW] * 4, ["train.objective=sft"], "cannot tell the data format"),
    ([PREF_ROW] * 4, ["train.beta=0"], "train.beta=0.0"),
    ([PREF_ROW, PREF_ROW, {"prompt": "x", "chosen": "y"}, PREF_ROW], [],
     "d.jsonl:3: missing 'rejected'"),
    ([{"prompt": "x", "chosen": "y", "rejected": "y"}] * 4, [], "identical"),
    ([PREF_ROW] * 4, ["model.adapter_init=runs/nothing"], "model.adapter_init"),
], ids=["dpo-on-sft-data", "sft-on-pairs", "beta-zero", "missing-rejected",
        "identical-everywhere", "adapter-init-missing"])
def test_bad_preference_input_is_one_line_exit_2(tmp_path, monkeypatch, capsys, rows, extra,
                                                 fragment):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    capsys.readouterr()
    rc = main([*BASE, *extra])
    out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip() and not re.search(r"\|\s*\d+/\d+ \[", ln)]
    assert rc == 2, (out, err)
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], err
    assert not (tmp_path / "runs").exists()


def test_adapter_init_must_fit_the_recipe_adapter(tmp_path):
    sft = run(tmp_path / "sft", "train.max_steps=1", "train.objective=sft",
              f"data.train={resolve_source('peftkit:data/sort_reverse/train.jsonl')}",
              "data.eval=", "adapter.targets=q_proj,v_proj", recipe="tiny-demo")
    with pytest.raises(UserError, match="model.adapter_init.*does not fit"):
        run(tmp_path / "dpo", "train.max_steps=1", f"model.adapter_init={sft.path}",
            "adapter.targets=q_proj,v_proj", "adapter.r=4")
    with pytest.raises(UserError, match="model.adapter_init.*missing for"):
        run(tmp_path / "dpo2", "train.max_steps=1", f"model.adapter_init={sft.path}")
