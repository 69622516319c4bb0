"""The forgetting meter (peftkit/training/forgetting.py) on a tiny model: `before` is the base's
own loss on the general-text sample, `after` moves with training, the warning fires past its
threshold, and result.json and the model card carry the figures."""

import json

import pytest
import torch

from peftkit.recipe import registry
from peftkit.recipe.overrides import apply_overrides
from peftkit.training import forgetting
from peftkit.training.loop import train

FAST = ["model.tiny_size=xs", "data.max_samples=64", "train.eval_generate=0",
        "train.warmup_steps=0", "train.max_steps=4", "train.batch_size=8", "train.lr=1e-2",
        "adapter.dropout=0.0", "train.forgetting=true", "train.forgetting_warn=0"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    entry = registry.resolve("tiny-demo")
    return train(apply_overrides(entry.recipe, [*FAST, f"train.output_dir={tmp}"]),
                 str(entry.path))


def base_loss(base_dir: str, tokenizer) -> float:
    """Mean next-token loss of the plain base on the sample, computed without peftkit's loop."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in forgetting.sample_examples(tokenizer):
            ids = torch.tensor([ex.input_ids])
            logits = model(input_ids=ids).logits[0, :-1]
            total += torch.nn.functional.cross_entropy(logits.float(), ids[0, 1:],
                                                       reduction="sum").item()
            count += len(ex.input_ids) - 1
    return total / count


def test_before_is_the_base_and_after_moves(trained):
    from transformers import AutoTokenizer

    f = trained.forgetting
    assert f is not None and f.samples == 64 and f.corpus == forgetting.CORPUS
    base_dir = json.loads((trained.path / "recipe.json").read_text())["base_path"]
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    assert f.before == pytest.approx(base_loss(base_dir, tokenizer), rel=1e-4)
    assert abs(f.after - f.before) > 1e-3  # training changed the adapted model's loss
    assert f.rise == pytest.approx((f.after - f.before) / f.before)


def test_result_json_and_card_carry_it(trained):
    saved = json.loads((trained.path / "result.json").read_text())["forgetting"]
    assert saved == pytest.approx(trained.forgetting.to_dict())
    card = (trained.path / "README.md").read_text()
    assert f"{trained.forgetting.before:.4f} for the base" in card
    assert "forgetting meter" in card


def test_warning_fires_past_the_threshold(trained):
    f = trained.forgetting
    assert forgetting.warning(f, threshold=f.rise - 1e-6) is not None
    assert forgetting.warning(f, threshold=f.rise + 1e-6) is None
    assert "train.forgetting_warn" in forgetting.warning(f, threshold=-1.0)


def test_warning_is_shown_during_training(tmp_path, capsys, monkeypatch):
    # Whether a few steps raise the tiny base's loss on English is chance: force a 50% rise.
    measured = forgetting.Forgetting(2.0, 3.0, 0.5, forgetting.CORPUS, 64)
    monkeypatch.setattr(forgetting, "measure", lambda *args, **kwargs: measured)
    entry = registry.resolve("tiny-demo")
    recipe = apply_overrides(entry.recipe, [*FAST, "train.max_steps=1", "train.forgetting_warn=0.4",
                                            f"train.output_dir={tmp_path}"])
    train(recipe, str(entry.path))
    err = " ".join(capsys.readouterr().err.split())  # rich wraps long lines
    assert "general-text loss rose 50.0% (2.000 -> 3.000)" in err
    assert "train.forgetting_warn=0.4" in err


def test_off_by_default_for_tiny_bases_on_for_real_ones(tmp_path):
    tiny = registry.resolve("tiny-demo").recipe
    assert not forgetting.enabled(tiny)
    assert forgetting.enabled(apply_overrides(tiny, ["model.tiny=false"]))
    assert not forgetting.enabled(apply_overrides(tiny, ["model.tiny=false",
                                                         "train.forgetting=false"]))
    run = train(apply_overrides(tiny, [*FAST, "train.max_steps=1", "train.forgetting=none",
                                       f"train.output_dir={tmp_path}"]), "")
    assert run.forgetting is None
    assert json.loads((run.path / "result.json").read_text())["forgetting"] is None
