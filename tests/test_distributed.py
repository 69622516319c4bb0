"""Two real gloo processes on CPU, started the way users start them (`--nproc 2`): DDP,
FSDP2 (torch's fully_shard over gloo, through accelerate's FSDP2 path) and DeepSpeed ZeRO-2/3
(through accelerate's DeepSpeed launcher and plugin).

Each launch costs ~15-40 s (two workers importing torch/transformers/deepspeed), so there are
nine; every strategy is compared with the same DDP run.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from peftkit.recipe import registry
from peftkit.recipe.overrides import apply_overrides
from peftkit.training.loop import train

SETTINGS = ["model.tiny_size=xs", "data.max_samples=512", "train.eval_generate=0",
            "train.log_every=1", "train.warmup_steps=0", "adapter.dropout=0.0",
            "train.max_steps=4", "train.save_every=2", "train.scheduler=linear"]


def launch(out, *extra, name="tiny-demo", settings=SETTINGS):
    """`peftkit train NAME --nproc 2` in a subprocess, each optimizer step two micro-batches
    of 2 per process (global batch 8, as one process with batch 8); returns the
    CompletedProcess."""
    cmd = [sys.executable, "-m", "peftkit", "train", name, "--nproc", "2", *settings,
           "train.batch_size=2", "train.grad_accum=2", f"train.output_dir={out}", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=os.environ)


def metrics(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def step_losses(path):
    return {r["step"]: r["loss"] for r in metrics(path) if "loss" in r}


def adapter(path):
    from safetensors.torch import load_file

    return load_file(path / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    proc = launch(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "accelerate launch" in proc.stderr and "--num_processes 2" in proc.stderr
    return out / "tiny-demo", proc


def test_two_processes_equal_one_with_the_same_global_batch(ddp_run, tmp_path):
    ddp_path, proc = ddp_run
    assert "on 2 x cpu" in proc.stderr
    entry = registry.resolve("tiny-demo")
    single = train(apply_overrides(entry.recipe, [*SETTINGS, "train.batch_size=8",
                                                   "train.grad_accum=1",
                                                   f"train.output_dir={tmp_path}"]))
    ddp, one = step_losses(ddp_path), step_losses(single.path)
    assert sorted(ddp) == [1, 2, 3, 4]  # each step logged once: one writer
    assert [ddp[s] for s in sorted(ddp)] == pytest.approx([one[s] for s in sorted(one)],
                                                          rel=1e-5)
    a, b = adapter(ddp_path), adapter(single.path)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5, rtol=1e-4), name


def test_ddp_run_directory_is_written_once_and_loads_in_plain_peft(ddp_run):
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    path, _ = ddp_run
    records = metrics(path)
    assert sum(1 for r in records if r.get("event") == "data") == 1
    ckpt = path / "checkpoints" / "step-4"
    assert sorted(p.name for p in ckpt.glob("rng-rank*.pt")) == ["rng-rank0.pt", "rng-rank1.pt"]
    assert json.loads((ckpt / "state.json").read_text())["world_size"] == 2
    cfg = PeftConfig.from_pretrained(path / "adapter")
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(cfg.base_model_name_or_path), path / "adapter")
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 50, 60, 70]])).logits
    assert torch.isfinite(logits).all()


def test_two_process_resume_continues_the_trajectory(ddp_run, tmp_path):
    path, _ = ddp_run
    copy = tmp_path / "tiny-demo"
    shutil.copytree(path, copy)
    shutil.rmtree(copy / "checkpoints" / "step-4")
    proc = launch(tmp_path, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert step_losses(copy) == pytest.approx(step_losses(path), rel=1e-6)
    a, b = adapter(copy), adapter(path)
    assert all(torch.allclose(a[n], b[n], atol=1e-6) for n in a)


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    proc = launch(out, "launch.strategy=fsdp")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "tiny-demo", proc


def test_fsdp_trains_the_same_adapter_as_ddp_with_sharded_state(fsdp_run, ddp_run):
    fsdp_path, proc = fsdp_run
    ddp_path, _ = ddp_run
    held, whole = re.search(r"on 2 x cpu \(FSDP2: this process holds ([\d.]+) MB of "
                            r"([\d.]+) MB of weights\)", " ".join(proc.stderr.split())).groups()
    assert float(held) == pytest.approx(float(whole) / 2, rel=0.02)
    fsdp, ddp = step_losses(fsdp_path), step_losses(ddp_path)
    assert [fsdp[s] for s in sorted(fsdp)] == pytest.approx([ddp[s] for s in sorted(ddp)],
                                                            rel=1e-5)
    a, b = adapter(fsdp_path), adapter(ddp_path)  # gathered from the shards, saved once
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5, rtol=1e-4), name
    # Each process wrote its own optimizer shard: about half of DDP's full optimizer state.
    ckpt, full = fsdp_path / "checkpoints" / "step-4", ddp_path / "checkpoints" / "step-4"
    shards = sorted(ckpt.glob("optimizer-rank*.pt"))
    assert [p.name for p in shards] == ["optimizer-rank0.pt", "optimizer-rank1.pt"]
    assert not (ckpt / "optimizer.pt").exists()
    whole = (full / "optimizer.pt").stat().st_size
    assert all(p.stat().st_size < 0.75 * whole for p in shards)


def test_fsdp_resume_continues_the_trajectory(fsdp_run, tmp_path):
    path, _ = fsdp_run
    copy = tmp_path / "tiny-demo"
    shutil.copytree(path, copy)
    shutil.rmtree(copy / "checkpoints" / "step-4")
    proc = launch(tmp_path, "launch.strategy=fsdp", "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert step_losses(copy) == pytest.approx(step_losses(path), rel=1e-6)
    a, b = adapter(copy), adapter(path)
    assert all(torch.allclose(a[n], b[n], atol=1e-6) for n in a)


QLORA = ["model.tiny=true", "model.tiny_size=xs", "model.dtype=float32",
         "model.compute_dtype=float32", "model.quant_storage=float32", "data.format=chat",
         "data.train=peftkit:data/sort_reverse/train.jsonl", "data.max_samples=256",
         "data.max_len=64", "data.eval_size=32", "train.max_steps=3", "train.warmup_steps=0",
         "train.log_every=1", "adapter.dropout=0.0"]


def test_fsdp_qlora_shards_a_4bit_base_and_equals_one_process(tmp_path):
    """FSDP2 over an nf4 base (packed weights stored as float32 so they shard with the rest)
    trains the same adapter as one process with the same global batch."""
    pytest.importorskip("bitsandbytes")
    proc = launch(tmp_path / "fsdp", "launch.strategy=fsdp", name="llama3-8b-qlora",
                  settings=QLORA)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(FSDP2: this process holds" in proc.stderr
    entry = registry.resolve("llama3-8b-qlora")
    single = train(apply_overrides(entry.recipe, [*QLORA, "train.batch_size=8",
                                                   "train.grad_accum=1",
                                                   f"train.output_dir={tmp_path / 'one'}"]))
    sharded = tmp_path / "fsdp" / "llama3-8b-qlora"
    assert step_losses(sharded) == pytest.approx(step_losses(single.path), rel=1e-5)
    a, b = adapter(sharded), adapter(single.path)
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6, rtol=1e-4), name


def test_deepspeed_zero2_trains_the_same_adapter_as_ddp(ddp_run, tmp_path):
    pytest.importorskip("deepspeed")
    proc = launch(tmp_path, "launch.strategy=deepspeed", "launch.zero_stage=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--use_deepspeed --zero_stage 2" in proc.stderr
    assert "(DeepSpeed ZeRO-2: optimizer state and gradients sharded, weights replicated)" \
        in " ".join(proc.stderr.split())
    assert "is deprecated" not in proc.stderr  # DeepSpeed's collective warnings are muted
    ddp_path, _ = ddp_run
    zero, ddp = step_losses(tmp_path / "tiny-demo"), step_losses(ddp_path)
    assert [zero[s] for s in sorted(zero)] == pytest.approx([ddp[s] for s in sorted(ddp)],
                                                            rel=1e-5)
    a, b = adapter(tmp_path / "tiny-demo"), adapter(ddp_path)
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[n], b[n], atol=1e-5, rtol=1e-4) for n in a)
    ckpt = tmp_path / "tiny-demo" / "checkpoints" / "step-4"
    assert sorted(p.name for p in ckpt.glob("optimizer*.pt")) == ["optimizer-rank0.pt",
                                                                  "optimizer-rank1.pt"]


def test_deepspeed_zero3_shards_weights_trains_like_ddp_and_resumes(ddp_run, tmp_path):
    pytest.importorskip("deepspeed")
    proc = launch(tmp_path / "full", "launch.strategy=deepspeed", "launch.zero_stage=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    held, whole = re.search(r"\(DeepSpeed ZeRO-3: this process holds ([\d.]+) MB of "
                            r"([\d.]+) MB of weights\)", " ".join(proc.stderr.split())).groups()
    assert float(held) == pytest.approx(float(whole) / 2, rel=0.02)
    path, (ddp_path, _) = tmp_path / "full" / "tiny-demo", ddp_run
    assert step_losses(path) == pytest.approx(step_losses(ddp_path), rel=1e-5)
    a, b = adapter(path), adapter(ddp_path)  # gathered from the partitions, saved once
    assert all(torch.allclose(a[n], b[n], atol=1e-5, rtol=1e-4) for n in a)
    # Resume from step 2: each process loads its optimizer partition back.
    copy = tmp_path / "resumed" / "tiny-demo"
    shutil.copytree(path, copy)
    shutil.rmtree(copy / "checkpoints" / "step-4")
    proc = launch(tmp_path / "resumed", "launch.strategy=deepspeed", "launch.zero_stage=3",
                  "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert step_losses(copy) == pytest.approx(step_losses(path), rel=1e-6)
    a, b = adapter(copy), adapter(path)
    assert all(torch.allclose(a[n], b[n], atol=1e-6) for n in a)


def test_bad_input_inside_the_workers_is_one_line_and_exit_2(tmp_path):
    """The workers find the problem (the data file is read there): the launcher's own
    traceback and failure table are dropped, the main worker's exit code comes through."""
    proc = launch(tmp_path, f"data.train={tmp_path / 'missing.jsonl'}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[0].startswith("launching: ACCELERATE_USE_CPU=true accelerate launch ")
    assert len(lines) == 2 and lines[1].startswith("error: ") and "missing.jsonl" in lines[1], \
        proc.stderr
    assert not (tmp_path / "tiny-demo").exists()
