"""`peftkit merge`: the merged model equals the adapter model, reloads with plain transformers,
and a merge that does not reproduce the trained model is refused (exit 1, output marked)."""

import json
import shutil

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
    dequantized = check(report, "dequantized base")
    assert dequantized["max_abs_logit_diff"] > 1e-4  # nf4 rounding, measured and reported
    assert check(report, "as trained")["precision"] == "fp32"
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert getattr(merged.config, "quantization_config", None) is None
    assert all(p.dtype == torch.float32 for p in merged.parameters())


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
