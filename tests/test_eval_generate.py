"""`peftkit eval`, `generate` and `chat` on a trained run, checked against peftkit.training.evaluation
and plain transformers + peft."""

import io
import json
import math

import pytest
import torch

from peftkit.recipe import registry
from peftkit.cli.app import main
from peftkit.recipe.schema import recipe_from_dict
from peftkit.recipe.overrides import apply_overrides
from peftkit.training.loop import train

PROMPT = "Sort: 3 1 2"


def demo_run(tmp_path_factory, *overrides):
    entry = registry.resolve("tiny-demo")
    recipe = apply_overrides(entry.recipe, [
        "model.tiny_size=xs", "data.max_samples=64", "data.eval=", "data.eval_size=24",
        "train.eval_generate=0", "train.batch_size=8", "train.warmup_steps=0",
        "train.save_every=0", "train.eval_every=0",
        f"train.output_dir={tmp_path_factory.mktemp('runs')}", *overrides])
    return train(recipe, str(entry.path))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A short demo run (xs): enough steps for the adapter to change the held-out loss."""
    return demo_run(tmp_path_factory, "train.max_steps=6", "train.lr=1e-2")


@pytest.fixture(scope="module")
def talker(tmp_path_factory):
    """A run whose answers depend on the prompt and on the adapter: a few real steps collapse
    a random tiny model onto one answer for every prompt, so after one step its LoRA B
    matrices are replaced by random ones (and plain peft loads the same file)."""
    from safetensors.torch import load_file, save_file

    result = demo_run(tmp_path_factory, "train.max_steps=1", "train.lr=1e-4",
                      "adapter.modules_to_save=", "data.max_samples=8", "data.eval_size=8")
    file = result.path / "adapter" / "adapter_model.safetensors"
    weights, gen = load_file(file), torch.Generator().manual_seed(0)
    for key in weights:
        if "lora_B" in key:
            weights[key] = torch.randn(weights[key].shape, generator=gen) * 0.5
    save_file(weights, file)
    return result


def plain_peft(run):
    """The run's adapter on its base, loaded with transformers + peft only."""
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = run.path / "adapter"
    base = PeftConfig.from_pretrained(adapter).base_model_name_or_path
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
    tokenizer_dir = run.path / "tokenizer"
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir if tokenizer_dir.is_dir() else base)
    return model.eval(), tokenizer


def plain_generate(model, tokenizer, messages, max_new_tokens):
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_eval_matches_peftkit_evaluation_and_base_differs(run, capsys):
    from accelerate import Accelerator

    from peftkit.data import dataset
    from peftkit.training.evaluation import eval_loss, exact_match
    from peftkit.training.loss import TokenLoss

    assert main(["eval", str(run.path), "--metrics", "loss,perplexity"]) == 0
    assert main(["eval", str(run.path), "--metrics", "loss,perplexity", "--base"]) == 0
    assert main(["eval", str(run.path), "--limit", "5", "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert "base model on" in out and "exact_match" in out
    evals = json.loads((run.path / "eval.json").read_text())
    adapter, base = evals["adapter"], evals["base"]
    # The same held-out rows training scored, before (= base: B starts at zero) and after.
    assert base["metrics"]["eval_loss"] == pytest.approx(run.evals["before"]["eval_loss"],
                                                         rel=1e-5)
    assert base["metrics"]["perplexity"] == pytest.approx(
        math.exp(base["metrics"]["eval_loss"]))
    assert adapter["samples"] == 5 and adapter["limit"] == 5  # the limited run came last
    assert base["metrics"]["eval_loss"] - run.evals["after"]["eval_loss"] > 0.05

    # Independently: peftkit.training.evaluation's functions on the plain-peft model, same 5 rows.
    model, tokenizer = plain_peft(run)
    recipe = recipe_from_dict(json.loads((run.path / "recipe.json").read_text())["recipe"])
    _, examples, prompts, _ = dataset.build(recipe.data, tokenizer, recipe.train.seed)
    acc = Accelerator()
    loss = eval_loss(acc, TokenLoss(model), examples[:5], 8, tokenizer.pad_token_id)
    score, rows = exact_match(acc, model, tokenizer, prompts[:5], 6)
    assert adapter["metrics"]["eval_loss"] == pytest.approx(loss, rel=1e-6)
    assert adapter["metrics"]["perplexity"] == pytest.approx(math.exp(loss), rel=1e-6)
    assert adapter["metrics"]["exact_match"] == score
    assert [a["answer"] for a in adapter["answers"]] == [r[1] for r in rows[:3]]

    logged = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    cli = [r for r in logged if r.get("event") == "eval_cli"]
    assert [r["model"] for r in cli] == ["adapter", "base", "adapter"]
    assert cli[-1]["results"] == adapter["metrics"]
    card = (run.path / "README.md").read_text()
    assert "### `peftkit eval`" in card
    assert f"| eval_loss | {base['metrics']['eval_loss']:.4f} |" in card


def test_eval_on_a_data_file(run, tmp_path):
    rows = [{"prompt": "Sort: 2 1\nAnswer:", "completion": " 1 2"},
            {"prompt": "Sort: 3 2\nAnswer:", "completion": " 2 3"},
            {"prompt": "Sort: 9 8\nAnswer:", "completion": " 8 9"}]
    file = tmp_path / "held.jsonl"
    file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["eval", str(run.path), "--data", str(file), "--metrics", "perplexity"]) == 0
    entry = json.loads((run.path / "eval.json").read_text())["adapter"]
    assert entry["data"] == str(file) and entry["samples"] == 3
    assert list(entry["metrics"]) == ["perplexity"] and entry["metrics"]["perplexity"] > 1


def test_eval_errors_name_the_problem(run, tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nope")]) == 2
    assert str(tmp_path / "nope") in capsys.readouterr().err
    assert main(["eval", str(run.path), "--metrics", "loss,acuracy"]) == 2
    assert "available: loss, perplexity, exact_match" in capsys.readouterr().err
    broken = tmp_path / "broken"
    (broken / "adapter").mkdir(parents=True)
    for name in ("recipe.json", "adapter/adapter_config.json"):
        (broken / name).write_text((run.path / name).read_text())
    (broken / "adapter" / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    assert main(["eval", str(broken)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(broken / "adapter") in err


def test_generate_is_deterministic_and_equals_plain_transformers(talker, capsys):
    run = talker
    args = ["generate", str(run.path), PROMPT, "--max-new-tokens", "8"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first
    model, tokenizer = plain_peft(run)
    messages = [{"role": "user", "content": PROMPT}]
    expected = plain_generate(model, tokenizer, messages, 8)
    assert first == expected + "\n"  # streamed text, then the streamer's newline
    with model.disable_adapter():  # the adapter is what answered
        assert plain_generate(model, tokenizer, messages, 8) != expected

    sampled = ["generate", str(run.path), PROMPT, "Reverse: a b", "--temperature", "1.5",
               "--top-k", "50", "--seed", "7", "--max-new-tokens", "8"]
    assert main(sampled) == 0
    once = capsys.readouterr().out
    assert main(sampled) == 0
    assert capsys.readouterr().out == once and "--- [2/2] Reverse: a b" in once
    assert main(["generate", str(run.path), PROMPT, "--top-p", "0"]) == 2


def test_chat_keeps_history_and_resets(talker, capsys, monkeypatch):
    run = talker
    turns = [PROMPT, "Reverse: a b c", "/reset", "Sort: 2 1", "/exit", "never read"]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(turns) + "\n"))
    assert main(["chat", str(run.path), "--max-new-tokens", "6"]) == 0
    answers = capsys.readouterr().out.splitlines()
    assert len(answers) == 3

    model, tokenizer = plain_peft(run)
    first = plain_generate(model, tokenizer, [{"role": "user", "content": PROMPT}], 6)
    second = plain_generate(model, tokenizer, [
        {"role": "user", "content": PROMPT}, {"role": "assistant", "content": first.strip()},
        {"role": "user", "content": "Reverse: a b c"}], 6)
    third = plain_generate(model, tokenizer, [{"role": "user", "content": "Sort: 2 1"}], 6)
    assert answers == [first, second, third]
    alone = plain_generate(model, tokenizer, [{"role": "user", "content": "Reverse: a b c"}], 6)
    assert len({first, second, third, alone}) == 4  # the history mattered
    monkeypatch.setattr("sys.stdin", io.StringIO(PROMPT))  # no newline, then end of input
    assert main(["chat", str(run.path), "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out.splitlines() == [first]
