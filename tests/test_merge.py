"""`peftkit merge`: the merged model equals the adapter model, reloads with plain transformers,
and a merge that does not reproduce the trained model is refused (exit 1, output marked)."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from peftkit.recipe import registry
from peftkit.cli.app import main
from peftkit.recipe.overrides import apply_overrides
from peftkit.training.loop import train

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing")

# The demo task, tiny (hidden 64, 2 layers), a few steps at a high learning rate so that the
# adapter moves the held-out loss; 8 held-out rows instead of the demo's 200.
QUICK = ["model.tiny_size=xs", "data.max_samples=64", "data.eval=", "data.eval_size=8",
         "train.eval_generate=0", "train.warmup_steps=0", "adapter.dropout=0.0",
         "train.max_steps=4", "train.batch_size=16", "train.lr=5e-3", "train.save_every=0",
         "train.eval_every=0", "train.log_every=1"]


def quick_run(root, *overrides):
    entry = registry.resolve("tiny-demo")
    recipe = apply_overrides(entry.recipe, [*QUICK, f"train.output_dir={root}", *overrides])
    return train(recipe, str(entry.path)).path


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    return quick_run(tmp_path_factory.mktemp("lora"))


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory):
    """QLoRA: nf4 base (double quantization) computing in float32 on CPU."""
    return quick_run(tmp_path_factory.mktemp("qlora"), "model.quantize=nf4")


def probe_ids():
    return torch.randint(3, 4000, (2, 24), generator=torch.Generator().manual_seed(1))


def adapter_logits(run, ids):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = json.loads((run / "recipe.json").read_text())["base_path"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base),
                                      run / "adapter").eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def merge(capsys, run, out, *flags):
    rc = main(["merge", str(run), "--out", str(out), *flags])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def check(report, name):
    return next(c for c in report["checks"] if c["name"] == name)


def test_fp32_merge_equals_adapter_and_reloads_with_plain_transformers(lora_run, tmp_path,
                                                                       capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    rc, printed, err = merge(capsys, lora_run, out)
    assert rc == 0, err
    report = json.loads((out / "merge_report.json").read_text())
    assert report["ok"] and report["dtype"] == "float32" and report["dequantized_from"] is None
    assert "held-out data" in report["batch"]["source"]
    assert check(report, "merge exact")["max_abs_logit_diff"] <= 1e-4
    assert check(report, "as trained")["ok"]  # against the loss recorded by training
    assert "merge exact" in printed and not (out / "MERGE_FAILED.txt").exists()

    ids = probe_ids()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()  # a fresh load, no peft
    assert type(merged).__name__ == "LlamaForCausalLM" and merged.config.use_cache
    with torch.no_grad():
        got = merged(input_ids=ids).logits
    expected = adapter_logits(lora_run, ids)
    assert (got - expected).abs().max().item() <= 1e-4
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template and (out / "generation_config.json").is_file()
    assert tokenizer.apply_chat_template([{"role": "user", "content": "Sort: 2 1"}],
                                         tokenize=False, add_generation_prompt=True)
    events = [json.loads(line) for line in (lora_run / "metrics.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "merge" and events[-1]["ok"] is True


def test_bf16_merge_passes_its_looser_check(lora_run, tmp_path, capsys):
    out = tmp_path / "bf16"
    rc, _, err = merge(capsys, lora_run, out, "--dtype", "bf16")
    assert rc == 0, err
    report = json.loads((out / "merge_report.json").read_text())
    exact = check(report, "merge exact")
    assert report["dtype"] == "bfloat16" and exact["tolerance"] > 1e-4
    assert 0 < exact["max_abs_logit_diff"] <= exact["tolerance"]  # bf16 rounding is visible
    assert check(report, "as trained")["precision"] == "16-bit"


def test_qlora_merge_is_done_unquantized_and_reports_the_deviation(qlora_run, tmp_path,
                                                                   capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    rc, printed, err = merge(capsys, qlora_run, out)
    assert rc == 0, err
    assert "never into nf4 weights" in printed
    report = json.loads((out / "merge_report.json").read_text())
    assert report["ok"] and report["dequantized_from"] == "nf4"
    assert check(report, "merge exact")["max_abs_logit_diff"] <= 1e-4
    # nf4 rounding, measured and reported: in the base's original weights, not merged into
    original = report["target"]["candidates"]["original"]
    assert original["max_abs_logit_diff"] > 1e-4 and "dequantized base" in printed
    as_trained = check(report, "as trained")
    assert as_trained["precision"] == "fp32"
    # The adapter on the reloaded 4-bit base is the model training measured: same weights,
    # same float32 kernels (not bitsandbytes' bf16 CPU inference kernel), same loss.
    assert abs(as_trained["merged_loss"] - as_trained["reference_loss"]) \
        <= 1e-6 * as_trained["reference_loss"]
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert getattr(merged.config, "quantization_config", None) is None
    assert all(p.dtype == torch.float32 for p in merged.parameters())


def test_qlora_merge_measures_both_targets_and_merges_into_the_closer(qlora_run, tmp_path,
                                                                      capsys):
    """Original-precision weights vs the nf4-dequantized ones, each with the adapter, against
    the adapter on the nf4 base: the dequantized weights are what the adapter was trained on,
    so they win, and the merged model reproduces the trained one (to float32 rounding)."""
    from peftkit.run.card import merge_section

    out = tmp_path / "merged"
    rc, printed, err = merge(capsys, qlora_run, out)
    assert rc == 0, err
    report = json.loads((out / "merge_report.json").read_text())
    target = report["target"]
    original, dequantized = target["candidates"]["original"], target["candidates"]["dequantized"]
    assert target["chosen"] == "dequantized" and "merge target:" in printed
    assert dequantized["max_abs_logit_diff"] <= 1e-4 < original["max_abs_logit_diff"]
    assert dequantized["greedy_agreement"] == 1.0
    assert abs(dequantized["loss_change"]) <= 1e-5 * target["reference_loss"]
    dequant_check = check(report, "dequantized base")
    assert dequant_check["max_abs_logit_diff"] <= 1e-4  # the merged model, not only the adapter
    assert check(report, "merge exact")["ok"]
    assert "merge target: " in merge_section(report)


def test_qlora_merge_falls_back_to_the_original_weights(qlora_run, tmp_path, capsys,
                                                       monkeypatch):
    """When quantizing the weights again does not reproduce the quantized model (here: made
    to differ), the dequantized target is not used: the original weights are loaded again."""
    from peftkit.export import measure as merging

    requantized = merging._requantized
    monkeypatch.setattr(merging, "_requantized",
                        lambda weight, info, device: requantized(weight, info, device) * 1.01)
    out = tmp_path / "merged"
    rc, _, err = merge(capsys, qlora_run, out)
    assert rc == 0, err
    report = json.loads((out / "merge_report.json").read_text())
    assert report["target"]["chosen"] == "original"
    assert list(report["target"]["candidates"]) == ["original"]
    assert any("were not measured" in note for note in report["notes"])
    exact = check(report, "merge exact")  # against the adapter on the reloaded weights
    assert exact["ok"] and exact["max_abs_logit_diff"] <= 1e-4
    assert check(report, "dequantized base")["max_abs_logit_diff"] > 1e-4


def test_merge_of_a_tampered_adapter_fails_and_is_marked(qlora_run, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    run = tmp_path / "run"
    shutil.copytree(qlora_run, run)
    weights = run / "adapter" / "adapter_model.safetensors"
    tensors = load_file(weights)
    assert any("lora_B" in k for k in tensors)
    save_file({k: v * 10 if "lora_B" in k else v for k, v in tensors.items()}, weights)

    out = tmp_path / "merged"
    rc, _, err = merge(capsys, run, out)
    assert rc == 1 and "Traceback" not in err
    last = err.strip().splitlines()[-1]  # one line (above it: transformers' loading bars)
    assert last.startswith("error: merge verification failed") and "as trained" in last
    assert (out / "MERGE_FAILED.txt").is_file()  # kept, but marked
    report = json.loads((out / "merge_report.json").read_text())
    assert not report["ok"] and not check(report, "as trained")["ok"]
    assert check(report, "merge exact")["ok"]  # the merge itself was faithful to the file
    event = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert event["event"] == "merge" and event["ok"] is False


def test_merge_refuses_a_non_empty_out_before_loading(lora_run, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    rc, _, err = merge(capsys, lora_run, out)
    assert rc == 2 and "not empty" in err
    rc, _, err = merge(capsys, lora_run, out, "--overwrite")
    assert rc == 2 and "refusing to delete" in err
    assert (out / "notes.txt").read_text() == "mine"


# --- what loading, building and merging print: peftkit's lines, not libraries' chatter -------

def test_building_a_tiny_base_in_a_fresh_process_is_quiet(tmp_path):
    """Saving the tiny form goes through accelerate, which imports DeepSpeed when installed."""
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    env.update(PYTHONPATH=str(Path(__file__).resolve().parent.parent),
               PEFTKIT_CACHE=str(tmp_path / "cache"))
    done = subprocess.run([sys.executable, "-c", "from peftkit.model.tiny import build_tiny; "
                           "print(build_tiny('meta-llama/Llama-3.2-1B', 'llama', 'xs'))"],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    # DeepSpeed logs to stdout: only the path printed here may be there
    assert done.stderr == "" and done.stdout.strip().startswith(str(tmp_path / "cache")), \
        done.stdout


def test_loading_a_base_prints_a_note_not_a_progress_bar(capsys):
    from peftkit.model.loading import base_path, load_model

    tiny = registry.resolve("tiny-demo").recipe.model
    path = base_path(tiny)
    notes = []
    load_model(path, tiny, torch.float32, say=notes.append)
    assert notes == []  # a tiny base loads in milliseconds: nothing to say
    real = dataclasses.replace(tiny, name=path, tiny=False)
    load_model(path, real, torch.float32, say=notes.append)
    assert len(notes) == 1 and notes[0].startswith(f"loading the base weights: {path} (")
    assert "Loading weights" not in capsys.readouterr().err  # transformers' bar


def test_merge_in_a_fresh_process_prints_no_library_noise(lora_run, tmp_path):
    """As users run it: accelerate imports DeepSpeed (when installed) while the merged model
    saves, and DeepSpeed must not guess the accelerator out loud; no "Loading weights" bar."""
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    done = subprocess.run([sys.executable, "-m", "peftkit", "merge", str(lora_run), "--out",
                           str(tmp_path / "merged")], capture_output=True, text=True, env=env,
                          cwd=tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "Setting accelerator" not in output and "Loading weights" not in output, output
