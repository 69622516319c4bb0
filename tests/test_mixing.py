"""data.train with several sources: the syntax and its validation, the proportions an epoch
of training actually sees, determinism under the seed, and where the mix is recorded."""

import json
from collections import Counter

import pytest

from peftkit.data.batching import BatchStream
from peftkit.data.dataset import build
from peftkit.data.mixing import counts, mix_plan
from peftkit.errors import ConfigError, UserError
from peftkit.recipe import registry
from peftkit.recipe import Data
from peftkit.recipe.overrides import apply_overrides
from peftkit.recipe.train_sources import TrainSource, parse_train


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def three_sources(tmp_path):
    """Three files in three formats; each row says which file it is from (its first word)."""
    a = write_jsonl(tmp_path / "a.jsonl", [
        {"messages": [{"role": "user", "content": f"alpha {i}"},
                      {"role": "assistant", "content": f"{i}"}]} for i in range(100)])
    b = write_jsonl(tmp_path / "b.jsonl", [
        {"conversations": [{"from": "human", "value": f"beta {i}"},
                           {"from": "gpt", "value": f"{i}"}]} for i in range(40)])
    c = write_jsonl(tmp_path / "c.jsonl", [
        {"instruction": f"gamma {i}", "output": f"{i}"} for i in range(10)])
    return a, b, c


def source_of(example, tokenizer) -> str:
    text = tokenizer.decode(example.input_ids)
    return next(word for word in ("alpha", "beta", "gamma") if word in text)


def epoch_counts(examples, tokenizer, batch_size=5) -> Counter:
    """Samples per source over one epoch of training batches."""
    stream = BatchStream(examples, batch_size, seed=3)
    seen = [e for _ in range(stream.per_epoch) for e in stream.next()]
    return Counter(source_of(e, tokenizer) for e in seen)


# ---------------------------------------------------------------------------------------------
# The syntax

def test_one_source_parses_as_before(tmp_path):
    assert parse_train("train.jsonl") == ([TrainSource("train.jsonl")], [])
    assert parse_train("owner/name:test") == ([TrainSource("owner/name:test")], [])
    # an existing file is one source whatever its name holds
    odd = tmp_path / "a=1,b.jsonl"
    odd.write_text("{}\n")
    assert parse_train(str(odd)) == ([TrainSource(str(odd))], [])


def test_shares_passes_and_hub_ids_parse():
    sources, problems = parse_train("a.jsonl=0.7, owner/name:train=0.2,peftkit:d/x.jsonl=0.1")
    assert problems == []
    assert sources == [TrainSource("a.jsonl", share=0.7),
                       TrainSource("owner/name:train", share=0.2),
                       TrainSource("peftkit:d/x.jsonl", share=0.1)]
    sources, problems = parse_train("a.jsonl=2x, b.jsonl=0.5X, c.jsonl")
    assert problems == [] and [s.weight for s in sources] == ["2x", "0.5x", ""]


@pytest.mark.parametrize("text, fragments", [
    ("a.jsonl=0.7, b.jsonl=0.2", ["the shares sum to 0.9, not 1"]),
    ("a.jsonl=0.7, b.jsonl", ["'b.jsonl': no share, while other sources have one"]),
    ("a.jsonl=0.5, b.jsonl=2x", ["'b.jsonl=2x': no share"]),
    ("a.jsonl=1.5, b.jsonl=0", ["'a.jsonl=1.5': a share must be > 0 and <= 1 (for more passes "
                                "over a source write 1.5x)", "'b.jsonl=0': a share must be > 0"]),
    ("a.jsonl=0x", ["'a.jsonl=0x': passes must be > 0"]),
    ("a.jsonl=lots, b.jsonl=nanx", ["'a.jsonl=lots': the weight 'lots' is neither a share of "
                                    "the mix (0.3) nor a number of passes (2x)",
                                    "'b.jsonl=nanx': the weight 'nanx'"]),
    ("a.jsonl,,b.jsonl", ["source 2 of 'a.jsonl,,b.jsonl' is empty"]),
    ("=0.5, a.jsonl=0.5", ["'=0.5': a weight without a source"]),
    ("a.jsonl=0.5, a.jsonl=0.5", ["'a.jsonl' is named twice"]),
    ("", ["data.train: empty"]),
])
def test_every_problem_is_reported_naming_data_train(text, fragments):
    _, problems = parse_train(text)
    assert len(problems) == len(fragments), problems
    for problem, fragment in zip(problems, fragments):
        assert problem.startswith("data.train: ") and fragment in problem, problem


def test_recipe_validation_reports_mix_problems_with_the_others():
    demo = registry.resolve("tiny-demo").recipe
    with pytest.raises(ConfigError) as info:
        apply_overrides(demo, ["data.train=a.jsonl=0.6,b.jsonl=seven", "data.eval=x.jsonl,y.jsonl",
                               "train.lr=-1"])
    problems = info.value.problems
    assert any(p.startswith("data.train: 'b.jsonl=seven': the weight") for p in problems)
    assert "data.eval='x.jsonl,y.jsonl': one source, without a weight (mixing applies to " \
           "data.train)" in problems
    assert any(p.startswith("train.lr=") for p in problems) and len(problems) == 3
    ok = apply_overrides(demo, ["data.train=a.jsonl=0.6, owner/ds=0.4"])
    assert ok.data.train == "a.jsonl=0.6, owner/ds=0.4"


# ---------------------------------------------------------------------------------------------
# The draw

def test_share_counts_add_up_exactly():
    sources = [TrainSource(n, share=p) for n, p in (("a", 0.5), ("b", 0.3), ("c", 0.2))]
    assert counts(sources, [100, 40, 10]) == [75, 45, 30]
    assert sum(counts(sources, [7, 7, 7])) == 21  # largest remainders: no sample lost
    passes = [TrainSource("a", passes=2.0), TrainSource("b", passes=0.5), TrainSource("c")]
    assert counts(passes, [100, 40, 10]) == [200, 20, 10]
    assert counts(passes, [100, 40, 10], limit=23) == [20, 2, 1]  # max_samples, in proportion
    assert counts(sources, [100, 40, 10], limit=1000) == [75, 45, 30]  # a cap above: no change


def test_plan_is_fixed_by_the_seed():
    sources = [TrainSource("a", share=0.7), TrainSource("b", share=0.3)]
    plan = mix_plan(sources, [50, 5], seed=1)
    assert plan == mix_plan(sources, [50, 5], seed=1)
    assert plan != mix_plan(sources, [50, 5], seed=2)
    b_rows = Counter(row for source, row in plan if source == 1)
    # 0.3 of 55 = 16.5 -> 16 samples (the tied remainder goes to the first source) of 5 rows:
    # three whole passes and one more row
    assert sum(b_rows.values()) == 16 and sorted(b_rows.values()) == [3, 3, 3, 3, 4]
    a_rows = [row for source, row in plan if source == 0]
    assert len(a_rows) == 39 and len(set(a_rows)) == 39  # a subset, no repeats


# ---------------------------------------------------------------------------------------------
# What training sees

def test_shares_over_an_epoch_of_training(three_sources, bpe_tokenizer):
    a, b, c = three_sources
    cfg = Data(train=f"{a}=0.5, {b}=0.3, {c}=0.2", eval_size=0)
    train, _, _, stats = build(cfg, bpe_tokenizer, seed=0)
    measured = epoch_counts(train, bpe_tokenizer)
    assert measured == {"alpha": 75, "beta": 45, "gamma": 30}  # 150 samples, 30 batches
    shares = {k: v / 150 for k, v in measured.items()}
    assert shares == pytest.approx({"alpha": 0.5, "beta": 0.3, "gamma": 0.2}, abs=0.01)
    assert stats.format == "chat+sharegpt+alpaca"
    assert [(s.source, s.weight, s.format, s.rows, s.samples) for s in stats.sources] == [
        (a, "0.5", "chat", 100, 75), (b, "0.3", "sharegpt", 40, 45), (c, "0.2", "alpaca", 10, 30)]
    assert stats.rows == len(train) == 150
    # the same seed gives the same samples in the same order; another seed another draw
    assert build(cfg, bpe_tokenizer, seed=0)[0] == train
    assert build(cfg, bpe_tokenizer, seed=1)[0] != train
    # max_samples scales every source down in proportion
    capped, _, _, stats = build(Data(train=cfg.train, eval_size=0, max_samples=60),
                                bpe_tokenizer, 0)
    assert Counter(source_of(e, bpe_tokenizer) for e in capped) == {
        "alpha": 30, "beta": 18, "gamma": 12}
    assert [s.samples for s in stats.sources] == [30, 18, 12]


def test_passes_repeat_whole_sources(three_sources, bpe_tokenizer):
    a, b, c = three_sources
    train, _, _, stats = build(Data(train=f"{a}=2x, {b}=0.5x, {c}", eval_size=0),
                               bpe_tokenizer, seed=0)
    assert epoch_counts(train, bpe_tokenizer) == {"alpha": 200, "beta": 20, "gamma": 10}
    alpha = Counter(tuple(e.input_ids) for e in train if source_of(e, bpe_tokenizer) == "alpha")
    assert len(alpha) == 100 and set(alpha.values()) == {2}  # every row exactly twice
    assert [s.samples for s in stats.sources] == [200, 20, 10]


def test_hold_out_draws_from_every_source_before_the_mix(three_sources, bpe_tokenizer):
    a, b, _ = three_sources
    train, evals, prompts, stats = build(Data(train=f"{a}=0.5, {b}=0.5", eval_size=14),
                                         bpe_tokenizer, seed=0)
    held = {tuple(e.input_ids) for e in evals}
    assert len(held) == 14 and not held & {tuple(e.input_ids) for e in train}
    assert {source_of(e, bpe_tokenizer) for e in evals} == {"alpha", "beta"}
    assert sum(s.rows for s in stats.sources) == 140 - 14 and len(train) == 126
    assert len(prompts) == 14


def test_a_source_of_the_mix_that_fails_is_named(three_sources, bpe_tokenizer, tmp_path):
    a, _, _ = three_sources
    with pytest.raises(UserError, match=r"nope\.jsonl: file not found"):
        build(Data(train=f"{a}=0.5, {tmp_path / 'nope.jsonl'}=0.5"), bpe_tokenizer, seed=0)
    with pytest.raises(UserError, match=r"someone/data: not a local file, and the Hugging "
                                        r"Face Hub is unreachable"):
        build(Data(train=f"{a}=0.5, someone/data=0.5"), bpe_tokenizer, seed=0)


# ---------------------------------------------------------------------------------------------
# Where the mix is recorded: `peftkit show --data`, the model card

def test_show_data_prints_the_mix(three_sources, capsys):
    from peftkit.cli.app import main

    a, b, c = three_sources
    assert main(["show", "tiny-demo", "model.tiny_size=xs", f"data.train={a}=0.5,{b}=0.3,{c}=0.2",
                 "data.format=auto", "data.eval=", "data.eval_size=0", "data.max_samples=0",
                 "--data"]) == 0
    out = capsys.readouterr().out
    assert "data (chat+sharegpt+alpaca):" in out
    assert f"    {a}=0.5 (chat): 100 rows -> 75 samples, 50.0%" in out
    assert f"    {b}=0.3 (sharegpt): 40 rows -> 45 samples, 30.0%" in out
    assert f"    {c}=0.2 (alpaca): 10 rows -> 30 samples, 20.0%" in out


def test_the_card_lists_the_mix():
    from types import SimpleNamespace

    from peftkit.run.card import metadata, model_card

    recipe = apply_overrides(registry.resolve("tiny-demo").recipe,
                             ["data.train=a.jsonl=0.75, owner/chat:train=0.25"])
    sources = [{"source": "a.jsonl", "weight": "0.75", "format": "alpaca", "rows": 30,
                "samples": 30},
               {"source": "owner/chat:train", "weight": "0.25", "format": "sharegpt",
                "rows": 4, "samples": 10}]
    result = SimpleNamespace(trainable=1, total=2, steps=1, train_loss=1.0, tokens_per_s=1.0,
                             evals={}, memory={})
    card = model_card(recipe, result, [{"event": "data", "sources": sources}])
    assert "## Training data" in card
    assert "| `a.jsonl` | 0.75 | alpaca | 30 | 30 | 75.0% |" in card
    assert "| `owner/chat:train` | 0.25 | sharegpt | 4 | 10 | 25.0% |" in card
    assert "- owner/chat" in metadata(recipe)  # the Hub source, as a dataset id
    assert "## Training data" not in model_card(recipe, result, [])  # one plain source
