"""`peftkit bench`: it runs, and its accounting (samples, tokens, equal work, FLOPs) is right.

No speed is asserted anywhere: timings depend on the machine and on its load.
"""

import copy
import dataclasses
import json
import shutil
import statistics

import pytest

from peftkit.bench import harness as bench
from peftkit.bench import data as bench_data
from peftkit.bench import same_work
from peftkit.cli.app import main

QUICK = ["model.tiny_size=xs", "train.batch_size=8"]  # the demo recipe: chat rows, max_len 64
# A high learning rate from step 1: the sides' different batch orders then move the mean
# training loss by far more than 2%, with the same computation on every side.
STEPS = 3
BENCH = ["bench", "tiny-demo", *QUICK, "train.lr=5e-2", "train.warmup_steps=0", "--steps",
         str(STEPS), "--vs", "hf,hf-grouped", "--inline"]


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """One in-process comparison with the Trainer baseline; also keeps the raw sides, and the
    recipe they ran (with a copy of its samples file) in `captured["recipe"]`."""
    folder = tmp_path_factory.mktemp("bench")
    out = folder / "demo.json"
    captured, recipes = {}, []
    real = bench.run_sides

    def keep(recipe, *args, **kwargs):
        captured.update(real(recipe, *args, **kwargs))
        samples = folder / "samples.jsonl"  # the original goes with bench's temporary folder
        shutil.copy(recipe.data.train, samples)
        recipes.append(dataclasses.replace(recipe, data=dataclasses.replace(
            recipe.data, train=str(samples))))
        return captured

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bench, "run_sides", keep)
        code = main([*BENCH, "--out", str(out)])
    return code, json.loads(out.read_text()), captured, out, recipes[0]


def _work(result: dict, sides: dict) -> dict:
    return {"tokens": result["tokens"], "samples": result["samples"],
            "fingerprints": sorted(sides["peftkit"]["samples"])}


def test_bench_compares_the_same_work(compared):
    import random

    import torch
    from transformers.trainer_pt_utils import get_length_grouped_indices

    from peftkit.data import dataset
    from peftkit.recipe import registry
    from peftkit.recipe.overrides import apply_overrides
    from peftkit.model.loading import base_path, load_tokenizer

    code, result, _, out, _ = compared
    assert code == 0
    assert result["samples"] == 8 * STEPS and result["steps"] == STEPS
    # The samples, independently: 2 of the batches that the Trainer's length grouping forms
    # over all demo rows, drawn with the recipe's seed.
    recipe = apply_overrides(registry.resolve("tiny-demo").recipe,
                             [*QUICK, "data.eval=", "data.eval_size=0"])
    tokenizer, _ = load_tokenizer(base_path(recipe.model), recipe.model)
    examples, _, _, _ = dataset.build(recipe.data, tokenizer, recipe.train.seed)
    lengths = [len(e.input_ids) for e in examples]
    order = get_length_grouped_indices(lengths, 8,
                                       generator=torch.Generator().manual_seed(recipe.train.seed))
    groups = [order[i:i + 8] for i in range(0, len(order) - 7, 8)]
    picked = sorted(random.Random(recipe.train.seed).sample(range(len(groups)), STEPS))
    assert result["selection"]["batches_picked"] == picked
    assert result["tokens"] == sum(lengths[i] for g in picked for i in groups[g])
    for side in ("peftkit", "hf", "hf-grouped"):
        raw = result["raw"][side]
        assert sum(raw["step_tokens"]) == result["tokens"]
        assert len(raw["step_seconds"]) == len(raw["step_loss"]) == STEPS
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
    _, _, sides, _, _ = compared
    tampered = copy.deepcopy(sides)
    tampered["hf"]["samples"] = tampered["hf"]["samples"][1:]  # one sample never trained
    monkeypatch.setattr(bench, "run_sides", lambda *a, **k: tampered)
    code = main([*BENCH, "--out", str(tmp_path / "r.json")])
    assert code == 1
    assert "refused" in capsys.readouterr().err
    result = json.loads((tmp_path / "r.json").read_text())
    assert not result["equal_work"]["ok"] and result["ratios"] == {}


def test_order_only_differences_pass_and_are_reported(compared):
    """At a high learning rate the sides' batch orders move the mean loss by more than 2%
    (the check before `equal_work` separated the two refused this); the comparison stands
    and the differences are reported."""
    from peftkit.bench import report as bench_report

    code, result, sides, _, _ = compared
    eq = result["equal_work"]
    assert code == 0 and eq["ok"] and eq["problems"] == []
    means = {name: statistics.fmean(s["step_loss"]) for name, s in sides.items()}
    for name in ("hf", "hf-grouped"):
        info = eq["info"][name]
        assert info["mean_loss"] == means[name]
        assert info["mean_loss_vs_peftkit"] == pytest.approx(
            (means[name] - means["peftkit"]) / means["peftkit"])
        assert info["final_loss_vs_peftkit"] == pytest.approx(
            (sides[name]["step_loss"][-1] - sides["peftkit"]["step_loss"][-1])
            / sides["peftkit"]["step_loss"][-1])
    assert max(abs(i["mean_loss_vs_peftkit"]) for i in eq["info"].values()) > 0.02
    lines = bench_report.footer(result)
    assert any(line.startswith(f"same work: the same {8 * STEPS} samples") for line in lines)
    mean_line = next(line for line in lines if "mean loss peftkit" in line)
    assert mean_line.startswith("training order (not compared")
    assert f"hf {means['hf']:.4f} ({eq['info']['hf']['mean_loss_vs_peftkit']:+.1%})" \
        in mean_line
    assert not any(line.startswith("NOT the same work") for line in lines)


def test_order_is_the_only_difference(compared, tmp_path, monkeypatch):
    """peftkit made to train the samples in hf-grouped's order (the file's) reproduces that
    side's losses step by step: what the mean-loss difference reflects is the order."""
    from peftkit.data import batching
    from peftkit.bench.side import run_side

    _, _, sides, _, recipe = compared
    monkeypatch.setattr(batching, "epoch_order", lambda n, seed, epoch: list(range(n)))
    recipe = dataclasses.replace(recipe, train=dataclasses.replace(
        recipe.train, output_dir=str(tmp_path)))
    ours = run_side("peftkit", recipe)
    theirs = sides["hf-grouped"]
    assert ours["step_tokens"] == theirs["step_tokens"]
    assert ours["step_loss"] == pytest.approx(theirs["step_loss"], rel=1e-4)
    assert sides["peftkit"]["step_loss"] != pytest.approx(theirs["step_loss"], rel=1e-2)


def test_a_different_computation_is_refused(compared, monkeypatch):
    """The Trainer side run with twice the LoRA scaling: the same samples and tokens and the
    same base model, but not the same computation."""
    from peftkit.bench import hf as bench_hf
    from peftkit.bench.side import run_side

    _, result, sides, _, recipe = compared
    lora_config = bench_hf.lora_config

    def doubled(adapter):
        return lora_config(dataclasses.replace(adapter, alpha=2 * adapter.alpha))

    monkeypatch.setattr(bench_hf, "lora_config", doubled)
    other = json.loads(json.dumps(run_side("hf", recipe)))
    verdict = same_work.equal_work(_work(result, sides), {"peftkit": sides["peftkit"], "hf": other},
                               STEPS, mixed=False)
    assert not verdict.ok
    assert any("hf: loss on the identical first batch (adapter on)" in p
               for p in verdict.problems), verdict.problems
    assert any("hf: adapter gradients on the identical first batch differ" in p
               for p in verdict.problems), verdict.problems
    assert not any("adapter off" in p or "tokens" in p or "samples" in p
                   for p in verdict.problems), verdict.problems


def test_equal_work_checks(compared):
    _, result, sides, _, _ = compared
    work = _work(result, sides)
    verdict = same_work.equal_work(work, sides, STEPS, mixed=False)
    assert verdict.ok and verdict.problems == [] and set(verdict.info) == {"hf", "hf-grouped"}
    # Training order alone: another trajectory over the same samples passes, reported.
    other = copy.deepcopy(sides)
    other["hf"]["step_loss"] = [x * 1.3 for x in other["peftkit"]["step_loss"]]
    verdict = same_work.equal_work(work, other, STEPS, mixed=False)
    assert verdict.ok and verdict.info["hf"]["mean_loss_vs_peftkit"] == pytest.approx(0.3)
    # Each difference in computation refuses, named.
    changes = {
        "tokens": lambda s: s["step_tokens"].__setitem__(0, s["step_tokens"][0] - 1),
        "samples exactly once": lambda s: s.__setitem__("samples", s["samples"][1:]),
        "(adapter off)": lambda s: s.__setitem__("reference_loss", s["reference_loss"] * 1.01),
        "(adapter on)": lambda s: s.__setitem__("adapter_loss", s["adapter_loss"] * 1.001),
        "adapter gradients": lambda s: s["adapter_grad_norms"].update(
            {k: v * 1.01 for k, v in s["adapter_grad_norms"].items()}),
        "other adapter tensors": lambda s: s["adapter_grad_norms"].popitem(),
        "non-finite": lambda s: s["step_loss"].__setitem__(-1, float("nan")),
    }
    for fragment, change in changes.items():
        other = copy.deepcopy(sides)
        change(other["hf"])
        problems = same_work.equal_work(work, other, STEPS, mixed=False).problems
        assert len(problems) == 1 and problems[0].startswith("hf: ") \
            and fragment in problems[0], (fragment, problems)


def test_each_side_runs_in_its_own_process(tmp_path):
    out = tmp_path / "solo.json"
    assert main(["bench", "tiny-demo", *QUICK, "--steps", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["isolation"] == "one fresh process per side"
    side = result["sides"]["peftkit"]
    assert side["peak_memory_bytes"] > 0 and side["memory_method"]
    assert result["equal_work"]["ok"] and result["ratios"] == {}


def test_bad_arguments_are_user_errors():
    assert main(["bench", "tiny-demo", "--vs", "deepspeed"]) == 2
    assert main(["bench", "tiny-demo", "--steps", "0"]) == 2


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


# ---------------------------------------------------------------------------------------------
# The TRL side (`--vs trl`): SFTTrainer + peft, packed with bfd (needs peftkit[bench]).

TRL_STEPS = 2
TRL_BENCH = ["bench", "tiny-demo", *QUICK, "train.warmup_steps=0", "--steps", str(TRL_STEPS),
             "--vs", "trl", "--inline", "--repeat", "2"]


def _needs_trl():
    pytest.importorskip("trl", reason="the trl side needs TRL: pip install 'peftkit[bench]'")


@pytest.fixture(scope="module")
def trl_compared(tmp_path_factory):
    """peftkit and TRL, twice each, alternating, in this process; keeps the raw sides of the
    last run and the recipe they ran (with a copy of its samples file)."""
    _needs_trl()
    folder = tmp_path_factory.mktemp("bench-trl")
    out = folder / "demo.json"
    captured, recipes = {}, []
    real = bench.run_sides

    def keep(recipe, *args, **kwargs):
        captured.update(real(recipe, *args, **kwargs))
        samples = folder / "samples.jsonl"
        shutil.copy(recipe.data.train, samples)
        recipes.append(dataclasses.replace(recipe, data=dataclasses.replace(
            recipe.data, train=str(samples))))
        return copy.deepcopy(captured)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bench, "run_sides", keep)
        code = main([*TRL_BENCH, "--out", str(out)])
    return code, json.loads(out.read_text()), captured, recipes[-1]


def test_trl_side_does_the_same_work(trl_compared):
    code, result, sides, _ = trl_compared
    assert code == 0 and result["equal_work"]["ok"], result["equal_work"]["problems"]
    assert result["repeat"] == 2 and [len(v) for v in result["runs"].values()] == [2, 2]
    raw, ours, trl = result["raw"]["trl"], result["sides"]["peftkit"], result["sides"]["trl"]
    assert sum(raw["step_tokens"]) == result["tokens"] and len(raw["step_loss"]) == TRL_STEPS
    assert sum(sides["trl"]["step_samples"]) == result["samples"]
    assert sorted(sides["trl"]["samples"]) == sorted(sides["peftkit"]["samples"])
    # Packed, padding-free: every computed token is a real one, as peftkit's.
    assert trl["packed"] and trl["padding_share"] == 0 == ours["padding_share"]
    settings = trl["side_settings"]
    assert settings["packing_strategy"] == "bfd" and settings["completion_only_loss"]
    # The identical batch: the same objective (completion + EOS tokens, mean over them).
    assert trl["reference_loss"] == pytest.approx(ours["reference_loss"], rel=1e-4)
    assert trl["adapter_loss"] == pytest.approx(ours["adapter_loss"], rel=1e-4)
    ratio = result["ratios"]["trl"]
    spread = ratio["spread"]["tokens_per_s"]
    assert len(spread["runs"]) == 2 and spread["min"] <= ratio["tokens_per_s"] <= spread["max"]


def test_trl_trains_peftkit_loss_mask(trl_compared):
    """TRL gets peftkit's samples with a completion mask that is exactly peftkit's labels: the
    completion and its EOS, not the prompt."""
    from peftkit.bench import trl_sft
    from peftkit.data import dataset
    from peftkit.model.loading import base_path, load_tokenizer

    _, _, _, recipe = trl_compared
    tokenizer, _ = load_tokenizer(base_path(recipe.model), recipe.model)
    examples, _, _, _ = dataset.build(recipe.data, tokenizer, recipe.train.seed)
    for e, f in zip(examples, trl_sft.features_of(examples)):
        assert f["input_ids"] == e.input_ids
        assert [t if m else -100 for t, m in zip(f["input_ids"], f["completion_mask"])] \
            == e.labels
        assert f["completion_mask"][0] == 0 and 1 in f["completion_mask"]
        # peftkit's samples end at the EOS of the (last) answer, which is learned: so in TRL
        assert e.input_ids[-1] == tokenizer.eos_token_id and f["completion_mask"][-1] == 1


def test_trl_with_another_loss_mask_is_refused(trl_compared, monkeypatch):
    """TRL trained on every token (prompt included): same samples and tokens, different
    objective; equal_work refuses on the identical batch."""
    from peftkit.bench import trl_sft
    from peftkit.bench.side import run_side

    _, result, sides, recipe = trl_compared
    features_of = trl_sft.features_of

    def whole_sequence(examples):
        return [dict(f, completion_mask=[1] * len(f["input_ids"])) for f in features_of(examples)]

    monkeypatch.setattr(trl_sft, "features_of", whole_sequence)
    other = json.loads(json.dumps(run_side("trl", recipe)))
    work = {"tokens": result["tokens"], "samples": result["samples"],
            "fingerprints": sorted(sides["peftkit"]["samples"])}
    verdict = same_work.equal_work(work, {"peftkit": sides["peftkit"], "trl": other},
                                   TRL_STEPS, mixed=False)
    assert any("trl: loss on the identical first batch (adapter off)" in p
               for p in verdict.problems), verdict.problems
    assert not any(p.startswith("trl: trained") or "exactly once" in p
                   for p in verdict.problems), verdict.problems


def test_trl_rows_match_the_steps():
    """bfd packs the samples into exactly one row per micro-batch (steps x grad_accum)."""
    _needs_trl()
    from datasets import Dataset
    from trl.data_utils import pack_dataset

    from peftkit.bench.trl_sft import row_length

    lengths = [40, 300, 120, 77, 500, 16, 230, 64, 90, 180, 33, 410]
    features = [{"input_ids": list(range(n))} for n in lengths]
    for rows in (2, 3, 4):
        length = row_length(features, rows)
        assert length >= max(lengths)
        packed = pack_dataset(Dataset.from_list(features), length, "bfd")
        assert len(packed) == rows and sum(map(len, packed["input_ids"])) == sum(lengths)


def test_trl_absent_or_bad_repeat_is_a_user_error(monkeypatch, capsys):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "trl" else find_spec(name, *a, **k))
    assert main(["bench", "tiny-demo", "--vs", "trl"]) == 2
    assert "peftkit[bench]" in capsys.readouterr().err
    assert main(["bench", "tiny-demo", "--repeat", "0"]) == 2


def test_ratio_cells_show_the_spread():
    from peftkit.bench.report import ratio_cell

    assert ratio_cell({"tokens_per_s": 2.5}, "tokens_per_s") == "2.50x"
    spread = {"min": 2.1, "median": 2.5, "max": 3.0, "runs": [2.1, 2.5, 3.0]}
    assert ratio_cell({"tokens_per_s": 2.5, "spread": {"tokens_per_s": spread}},
                      "tokens_per_s") == "2.50x (2.10-3.00)"
    assert ratio_cell({"peak_memory": None}, "peak_memory") == "-"


# ---------------------------------------------------------------------------------------------
# The TRL side of a DPO recipe (`--vs trl` on train.objective=dpo): DPOTrainer + peft.

DPO_STEPS = 2
DPO_BENCH = ["bench", "demo-dpo", "model.tiny_size=xs", "train.batch_size=4",
             "train.warmup_steps=0", "--steps", str(DPO_STEPS), "--vs", "trl", "--inline"]


@pytest.fixture(scope="module")
def dpo_compared(tmp_path_factory):
    """peftkit and TRL's DPOTrainer on demo-dpo, in this process; keeps the raw sides and the
    recipe they ran (with a copy of its samples file)."""
    _needs_trl()
    folder = tmp_path_factory.mktemp("bench-dpo")
    out = folder / "dpo.json"
    captured, recipes = {}, []
    real = bench.run_sides

    def keep(recipe, *args, **kwargs):
        captured.update(real(recipe, *args, **kwargs))
        samples = folder / "samples.jsonl"
        shutil.copy(recipe.data.train, samples)
        recipes.append(dataclasses.replace(recipe, data=dataclasses.replace(
            recipe.data, train=str(samples))))
        return copy.deepcopy(captured)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bench, "run_sides", keep)
        code = main([*DPO_BENCH, "--out", str(out)])
    return code, json.loads(out.read_text()), captured, recipes[-1]


def test_trl_dpo_side_does_the_same_work(dpo_compared):
    import math

    from peftkit.data import preference
    from peftkit.data.sources import load_records
    from peftkit.model.loading import base_path, load_tokenizer

    code, result, sides, recipe = dpo_compared
    assert code == 0 and result["equal_work"]["ok"], result["equal_work"]["problems"]
    # The work, independently: the selected pairs' two sequences each (the prompt in both).
    tokenizer, _ = load_tokenizer(base_path(recipe.model), recipe.model)
    rows, _ = load_records(recipe.data.train, False)
    pairs, _ = preference.encode_pairs(rows, tokenizer, recipe.data)
    assert result["samples"] == len(pairs) == 4 * DPO_STEPS
    assert result["tokens"] == sum(len(p.chosen.input_ids) + len(p.rejected.input_ids)
                                   for p in pairs)
    prints = sorted(same_work.fingerprint(p.input_ids) for p in pairs)
    for name in ("peftkit", "trl"):
        assert sum(sides[name]["step_tokens"]) == result["tokens"]
        assert len(sides[name]["step_loss"]) == DPO_STEPS
        assert sides[name]["samples"] == prints
        assert result["sides"][name]["reference_seconds"] > 0
    settings = result["sides"]["trl"]["side_settings"]
    assert settings["precompute_ref_log_probs"] and not settings["padding_free"]
    assert not settings["activation_checkpointing"]  # the recipe's, not TRL's default (on)
    # The identical batch: the same reference log-probs (summed over each response), and the
    # same DPO loss with the adapter off (policy = reference: log 2) and with seeded values.
    ours, theirs = sides["peftkit"], sides["trl"]
    assert len(ours["reference_logps"]) == 2 * 4 and len(set(ours["reference_logps"])) > 1
    assert theirs["reference_logps"] == pytest.approx(ours["reference_logps"], rel=1e-4)
    assert ours["reference_loss"] == pytest.approx(math.log(2), rel=1e-6)
    assert theirs["reference_loss"] == pytest.approx(math.log(2), rel=1e-6)
    assert ours["adapter_loss"] != pytest.approx(math.log(2), rel=1e-3)
    assert theirs["adapter_loss"] == pytest.approx(ours["adapter_loss"], rel=1e-4)


def test_trl_dpo_with_other_settings_is_refused(dpo_compared, monkeypatch):
    """TRL trained with twice the beta: the same pairs, tokens and reference, another
    objective; and a reference that differs is named."""
    from peftkit.bench import trl_dpo
    from peftkit.bench.side import run_side

    _, result, sides, recipe = dpo_compared
    work = {"tokens": result["tokens"], "samples": result["samples"],
            "fingerprints": sorted(sides["peftkit"]["samples"])}
    config = trl_dpo._config

    def doubled(*args, **kwargs):
        args_ = config(*args, **kwargs)
        args_.beta *= 2
        return args_

    monkeypatch.setattr(trl_dpo, "_config", doubled)
    other = json.loads(json.dumps(run_side("trl", recipe)))
    problems = same_work.equal_work(work, {"peftkit": sides["peftkit"], "trl": other},
                                    DPO_STEPS, mixed=False).problems
    assert any("trl: loss on the identical first batch (adapter on)" in p for p in problems)
    assert not any("reference log-prob" in p or "exactly once" in p or p.startswith("trl: trained")
                   for p in problems), problems
    tampered = copy.deepcopy(sides)
    tampered["trl"]["reference_logps"][0] *= 1.01
    problems = same_work.equal_work(work, tampered, DPO_STEPS, mixed=False).problems
    assert len(problems) == 1 and "reference log-probabilities" in problems[0], problems


def test_preference_comparisons_trl_cannot_make_are_user_errors(capsys):
    assert main(["bench", "demo-dpo", "train.objective=orpo", "--vs", "trl"]) == 2
    assert main(["bench", "demo-dpo", "--vs", "hf"]) == 2
    assert main(["bench", "demo-dpo", "train.label_smoothing=0.1", "--vs", "trl"]) == 2
    err = capsys.readouterr().err
    assert "train.objective=orpo" in err and "SFT only" in err and "label_smoothing" in err
