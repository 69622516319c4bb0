"""`peftkit bench`: it runs, and its accounting (samples, tokens, equal work, FLOPs) is right.

No speed is asserted anywhere: timings depend on the machine and on its load.
"""

import copy
import json
import statistics

import pytest

from peftkit.bench import harness as bench
from peftkit.bench import data as bench_data
from peftkit.cli.app import main

QUICK = ["model.tiny_size=xs", "train.batch_size=8"]  # the demo recipe: chat rows, max_len 64


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """One in-process comparison with the Trainer baseline; also keeps the raw sides."""
    out = tmp_path_factory.mktemp("bench") / "demo.json"
    captured = {}
    real = bench.run_sides

    def keep(*args, **kwargs):
        captured.update(real(*args, **kwargs))
        return captured

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bench, "run_sides", keep)
        code = main(["bench", "demo", *QUICK, "--steps", "2", "--vs", "hf,hf-grouped",
                     "--inline", "--out", str(out)])
    return code, json.loads(out.read_text()), captured, out


def test_bench_compares_the_same_work(compared):
    import random

    import torch
    from transformers.trainer_pt_utils import get_length_grouped_indices

    from peftkit.data import dataset
    from peftkit.recipe import registry
    from peftkit.recipe.overrides import apply_overrides
    from peftkit.model.loading import base_path, load_tokenizer

    code, result, _, out = compared
    assert code == 0
    assert result["samples"] == 16 and result["steps"] == 2
    # The samples, independently: 2 of the batches that the Trainer's length grouping forms
    # over all demo rows, drawn with the recipe's seed.
    recipe = apply_overrides(registry.resolve("demo").recipe,
                             [*QUICK, "data.eval=", "data.eval_size=0"])
    tokenizer, _ = load_tokenizer(base_path(recipe.model), recipe.model)
    examples, _, _, _ = dataset.build(recipe.data, tokenizer, recipe.train.seed)
    lengths = [len(e.input_ids) for e in examples]
    order = get_length_grouped_indices(lengths, 8,
                                       generator=torch.Generator().manual_seed(recipe.train.seed))
    groups = [order[i:i + 8] for i in range(0, len(order) - 7, 8)]
    picked = sorted(random.Random(recipe.train.seed).sample(range(len(groups)), 2))
    assert result["selection"]["batches_picked"] == picked
    assert result["tokens"] == sum(lengths[i] for g in picked for i in groups[g])
    for side in ("peftkit", "hf", "hf-grouped"):
        raw = result["raw"][side]
        assert sum(raw["step_tokens"]) == result["tokens"]
        assert len(raw["step_seconds"]) == len(raw["step_loss"]) == 2
        assert result["sides"][side]["tokens_per_s"] > 0
        assert result["sides"][side]["peak_memory_bytes"] > 0
        assert 0 < result["sides"][side]["mfu"] < 1
    ours, theirs = result["sides"]["peftkit"], result["sides"]["hf"]
    assert ours["packed"] and ours["padding_share"] == 0
    assert theirs["padding_share"] > 0  # demo prompts vary in length: the Trainer pads
    assert result["sides"]["hf-grouped"]["padding_share"] < theirs["padding_share"]
    assert ours["reference_loss"] == pytest.approx(theirs["reference_loss"], rel=1e-4)
    assert (ours["trainable"], ours["total"]) == (theirs["trainable"], theirs["total"])
    assert result["equal_work"]["ok"] and set(result["ratios"]) == {"hf", "hf-grouped"}
    env = result["environment"]
    assert env["versions"]["torch"] and env["versions"]["transformers"] and env["threads"] >= 1
    assert out.with_suffix(".png").is_file()


def test_unequal_work_is_refused(compared, tmp_path, monkeypatch, capsys):
    _, _, sides, _ = compared
    tampered = copy.deepcopy(sides)
    tampered["hf"]["samples"] = tampered["hf"]["samples"][1:]  # one sample never trained
    monkeypatch.setattr(bench, "run_sides", lambda *a, **k: tampered)
    code = main(["bench", "demo", *QUICK, "--steps", "2", "--vs", "hf,hf-grouped", "--inline",
                 "--out", str(tmp_path / "r.json")])
    assert code == 1
    assert "refused" in capsys.readouterr().err
    result = json.loads((tmp_path / "r.json").read_text())
    assert not result["equal_work"]["ok"] and result["ratios"] == {}


def test_equal_work_checks(compared):
    _, result, sides, _ = compared
    work = {"tokens": result["tokens"], "samples": 16,
            "fingerprints": sorted(sides["peftkit"]["samples"])}
    assert bench.equal_work(work, sides, 2, mixed=False) == []
    other = copy.deepcopy(sides)
    other["hf"]["reference_loss"] *= 1.01  # a different objective on the identical batch
    other["hf"]["step_loss"] = [x * 1.05 for x in other["hf"]["step_loss"]]
    other["hf"]["step_tokens"][0] -= 1
    problems = bench.equal_work(work, other, 2, mixed=False)
    assert any("tokens" in p for p in problems)
    other["hf"]["step_tokens"][0] += 1
    problems = bench.equal_work(work, other, 2, mixed=False)
    assert any("identical first batch" in p for p in problems)
    assert any("mean training loss" in p for p in problems)


def test_each_side_runs_in_its_own_process(tmp_path):
    out = tmp_path / "solo.json"
    assert main(["bench", "demo", *QUICK, "--steps", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["isolation"] == "one fresh process per side"
    side = result["sides"]["peftkit"]
    assert side["peak_memory_bytes"] > 0 and side["memory_method"]
    assert result["equal_work"]["ok"] and result["ratios"] == {}


def test_bad_arguments_are_user_errors():
    assert main(["bench", "demo", "--vs", "deepspeed"]) == 2
    assert main(["bench", "demo", "--steps", "0"]) == 2


def test_flops_accounting():
    import torch
    from transformers import AutoModelForCausalLM

    from peftkit.recipe import Lora, Model, Recipe
    from peftkit.bench.flops import Shape, shape_of, train_flops
    from peftkit.model.loading import attach_adapter
    from peftkit.model.summary import base_config

    config, _ = base_config(Recipe(Model("tiny/llama", arch="llama", tiny=True)))
    with torch.device("meta"):
        shape = shape_of(attach_adapter(AutoModelForCausalLM.from_config(config), Lora(r=4)))
    h, kv, inter, layers = 64, 32, 128, 2  # tiny xs: 4 heads of 16, 2 KV heads
    assert shape.frozen_linear == layers * (2 * h * h + 2 * h * kv + 3 * h * inter)
    assert shape.adapter_linear == layers * 4 * (2 * (h + h) + 2 * (h + kv) + 3 * (h + inter))
    assert shape.head == h * config.vocab_size and not shape.head_trained
    assert (shape.attention_width, shape.layers) == (64, 2)
    toy = Shape(frozen_linear=10, adapter_linear=2, head=100, head_trained=False,
                attention_width=4, layers=3)
    # 7 tokens: 4*10*7 + 6*2*7; 5 labelled: 4*100*5; pairs 3*4/2 + 4*5/2 = 16: 12*4*3*16
    assert train_flops(toy, [3, 4], 5) == 280 + 84 + 2000 + 2304


def test_benchmark_data_is_deterministic_and_long_tailed():
    from transformers import AutoTokenizer

    from peftkit.model.tiny import tokenizer_dir

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir())

    def tokens(rows):
        prompts = tokenizer([r["prompt"] for r in rows], add_special_tokens=False)["input_ids"]
        answers = tokenizer([r["completion"] for r in rows], add_special_tokens=False)["input_ids"]
        return [len(p) + len(a) + 1 for p, a in zip(prompts, answers)]  # + EOS

    varlen = bench_data.rows("varlen", 300)
    assert varlen == bench_data.rows("varlen", 300)
    lengths = tokens(varlen)
    assert min(lengths) >= 16 and max(lengths) <= 1024
    assert 180 <= statistics.median(lengths) <= 300 < statistics.fmean(lengths) + 100
    assert max(lengths) > 3 * statistics.median(lengths)  # a long tail
    assert set(tokens(bench_data.rows("fixed", 20))) == {256}
