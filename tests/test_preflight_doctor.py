"""Introspection and tracking: `peftkit show NAME --data` (peftkit/preflight.py), `peftkit
doctor`, and experiment trackers (train.report_to / --report-to)."""

import json
import statistics

import pytest

from peftkit.recipe import registry
from peftkit.cli.app import main
from peftkit.recipe.overrides import apply_overrides
from peftkit.data.example import IGNORE
from peftkit.data.preflight import CLOSE, OPEN, percentile, preflight

MAX_LEN = 20
ROWS = [
    {"prompt": "Sort: 3 1 2\nAnswer:", "completion": " 1 2 3"},
    {"prompt": "Sort: 9 8 7 6 5\nAnswer:", "completion": " 5 6 7 8 9"},
    {"prompt": "Reverse: a b\nAnswer:", "completion": " b a"},
    # the prompt alone is longer than MAX_LEN: truncation leaves no loss token -> dropped
    {"prompt": "the quick brown fox jumps over the lazy dog " * 3 + "\nAnswer:",
     "completion": " fox"},
    # prompt fits, completion is cut: kept, but its EOS is lost
    {"prompt": "Reverse: q w\nAnswer:",
     "completion": " w q and then a long tail of words, and more"},
    {"prompt": "Hi\nAnswer:", "completion": " hello"},
]


@pytest.fixture
def data_recipe(tmp_path):
    file = tmp_path / "rows.jsonl"
    file.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    entry = registry.resolve("tiny-demo")
    overrides = ["model.tiny_size=xs", f"data.train={file}", "data.format=auto", "data.eval=",
                 "data.eval_size=0", f"data.max_len={MAX_LEN}"]
    return apply_overrides(entry.recipe, overrides), overrides


def expected_samples(tokenizer):
    """Each row as the (input_ids, labels) training should see, computed directly."""
    bos = [tokenizer.bos_token_id] if tokenizer("x").input_ids[:1] == [tokenizer.bos_token_id] \
        else []
    samples = []
    for row in ROWS:
        prompt = bos + tokenizer(row["prompt"], add_special_tokens=False).input_ids
        completion = tokenizer(row["completion"], add_special_tokens=False).input_ids
        completion.append(tokenizer.eos_token_id)
        ids = prompt + completion
        labels = [IGNORE] * len(prompt) + completion
        samples.append((ids, labels))
    return samples


def test_preflight_numbers_on_a_known_dataset(data_recipe):
    from transformers import AutoTokenizer

    from peftkit.model.tiny import tokenizer_dir

    recipe, _ = data_recipe
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir())
    full = expected_samples(tokenizer)
    cut = [(ids[:MAX_LEN], labels[:MAX_LEN]) for ids, labels in full]
    kept = [(ids, labels) for ids, labels in cut if any(x != IGNORE for x in labels)]
    lengths = [len(ids) for ids, _ in kept]
    assert len(kept) == 5 and sum(len(ids) > MAX_LEN for ids, _ in full) == 2  # the setup

    report = preflight(recipe)
    assert (report.rows, report.samples, report.format) == (6, 5, "prompt_completion")
    assert report.truncated == 2 and report.dropped == 1
    assert report.lengths == {"min": min(lengths), "median": statistics.median(lengths),
                              "p90": sorted(lengths)[4], "max": MAX_LEN}
    assert report.tokens == sum(lengths)
    assert report.loss_tokens == sum(x != IGNORE for _, labels in kept for x in labels)
    assert report.loss_share == pytest.approx(report.loss_tokens / report.tokens)
    assert report.eos_trained == 4  # the cut completion lost its EOS
    ids, labels = full[0]
    n = labels.count(IGNORE)  # the prompt's tokens
    assert tokenizer.decode(ids[n:]) == " 1 2 3" + tokenizer.eos_token
    assert report.rendered[0] == [(tokenizer.decode(ids[:n]), False),
                                  (" 1 2 3" + tokenizer.eos_token, True)]


def test_percentile_is_nearest_rank():
    assert percentile(list(range(1, 11)), 90) == 9
    assert percentile([5], 90) == 5
    assert percentile([1, 2, 3, 4, 100], 90) == 100


def test_show_data_prints_the_report(data_recipe, capsys):
    recipe, overrides = data_recipe
    assert main(["show", "tiny-demo", *overrides, "--data"]) == 0
    out = capsys.readouterr().out
    report = preflight(recipe)
    assert "records: 6 train rows -> 5 samples" in out
    assert (f"tokens carrying loss: {report.loss_tokens} of {report.tokens} "
            f"({100 * report.loss_share:.1f}%)") in out
    assert f"2 samples exceed data.max_len={MAX_LEN}: truncated to {MAX_LEN} tokens; 1 of " \
        "them dropped" in out
    assert "EOS trained in 4 of 5 samples" in out
    assert f"{OPEN} 1 2 3<|eos|>{CLOSE}" in out and f"{OPEN} 5 6 7 8 9<|eos|>{CLOSE}" in out
    assert "\n    Answer:" in out  # a sample's own line breaks stay indented


def test_doctor_runs_offline_and_exits_0(capsys, monkeypatch):
    import os

    from peftkit.cli import doctor

    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    for expected in ("## versions", "- torch: ", "- peft: ", "- bitsandbytes: ", "## devices",
                     "- cpu: ", "- ram: ", "nf4 on cpu: ", "- hub: ", "HF_HUB_OFFLINE: 1",
                     "## accelerate", "- cache: "):
        assert expected in out, expected

    def _broken():
        raise RuntimeError("boom")

    monkeypatch.setitem(doctor.SECTIONS, "devices", _broken)
    assert main(["doctor"]) == 0
    assert "- broken: probe failed: RuntimeError: boom" in capsys.readouterr().out


def test_tensorboard_gets_the_metrics_jsonl_numbers(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert main(["train", "tiny-demo", "model.tiny_size=xs", "data.max_samples=16", "data.eval=",
                 "data.eval_size=8", "train.max_steps=3", "train.batch_size=4",
                 "train.warmup_steps=0", "train.log_every=1", "train.eval_generate=0",
                 "train.save_every=0", f"train.output_dir={tmp_path}", "name=tracked",
                 "--report-to", "tensorboard"]) == 0
    run = tmp_path / "tracked"
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert json.loads((run / "recipe.json").read_text())["recipe"]["train"]["report_to"] \
        == "tensorboard"
    events = EventAccumulator(str(run / "tb" / "tracked"))
    events.Reload()
    logged = {tag: [(e.step, e.value) for e in events.Scalars(tag)]
              for tag in events.Tags()["scalars"]}
    assert [s for s, _ in logged["train/loss"]] == [1, 2, 3]
    assert [v for _, v in logged["train/loss"]] == pytest.approx(
        [r["loss"] for r in records if "loss" in r], rel=1e-6)
    assert [v for _, v in logged["eval/eval_loss"]] == pytest.approx(
        [r["eval_loss"] for r in records if r.get("event") == "eval"], rel=1e-6)
    assert logged["data/rows"][0] == (0, 16)


def test_missing_tracker_is_a_clear_error(tmp_path, capsys):
    from peftkit.run.tracking import available

    if available("wandb"):
        pytest.skip("wandb is installed here")
    assert main(["train", "tiny-demo", "model.tiny_size=xs", f"train.output_dir={tmp_path}",
                 "--report-to", "wandb"]) == 2
    assert "train.report_to=wandb: wandb is not installed; pip install wandb" \
        in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before writing anything
