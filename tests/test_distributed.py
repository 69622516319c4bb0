"""Two real gloo processes on CPU, started the way users start them (`--nproc 2`): DDP,
FSDP2 (torch's fully_shard over gloo, through accelerate's FSDP2 path) and DeepSpeed ZeRO-2/3
(through accelerate's DeepSpeed launcher and plugin); two machines played by two launchers on
127.0.0.1; resuming on another number of processes.

Each launch costs ~15-40 s (two workers importing torch/transformers/deepspeed), so there are
few; every strategy is compared with the same DDP run.
"""

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from peftkit.data.batching import Position
from peftkit.errors import UserError
from peftkit.recipe import registry
from peftkit.recipe.overrides import apply_overrides
from peftkit.training import checkpoint, distributed, launcher
from peftkit.training import resume as resuming
from peftkit.training.loop import train

SETTINGS = ["model.tiny_size=xs", "data.max_samples=512", "train.eval_generate=0",
            "train.log_every=1", "train.warmup_steps=0", "adapter.dropout=0.0",
            "train.max_steps=4", "train.save_every=2", "train.scheduler=linear"]


def command(out, *extra, name="tiny-demo", settings=SETTINGS, nproc=2):
    return [sys.executable, "-m", "peftkit", "train", name, "--nproc", str(nproc), *settings,
            "train.batch_size=2", "train.grad_accum=2", f"train.output_dir={out}", *extra]


def launch(out, *extra, name="tiny-demo", settings=SETTINGS, nproc=2):
    """`peftkit train NAME --nproc 2` in a subprocess, each optimizer step two micro-batches
    of 2 per process (global batch 8, as one process with batch 8); returns the
    CompletedProcess."""
    return subprocess.run(command(out, *extra, name=name, settings=settings, nproc=nproc),
                          capture_output=True, text=True, timeout=300, env=os.environ)


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



DPO_RECIPE = str(Path(__file__).resolve().parents[1] / "recipes" / "demo_dpo.py")
DPO = ["model.tiny_size=xs", "data.max_samples=64", "data.eval=", "data.eval_size=12",
       "train.log_every=1", "train.warmup_steps=0", "train.max_steps=4", "train.save_every=0",
       "train.eval_every=2", "train.scheduler=linear", "train.lr=5e-3",
       "adapter.modules_to_save="]
PREFERENCE_FIGURES = ("loss", "rewards_chosen", "rewards_rejected", "reward_margin",
                      "preference_accuracy", "eval_loss")


def test_dpo_on_two_processes_equals_one_with_the_same_global_batch(tmp_path):
    """DPO under DDP: the reference log-probs, the pair counts each step divides by and the
    reward sums reduced over processes give the run of one process with the same global
    batch (8 pairs a step): the same loss, rewards, held-out figures and adapter.

    LoRA only: the recipe's fully trained LM head is no test of this. Chosen and rejected
    share most tokens, so many of the head's DPO gradients cancel to ~1e-10, rounding decides
    their sign, and AdamW turns that into updates of a few % of lr: one process with
    grad_accum 2 x 4 pairs differs from batch 8 by the same 5e-4 as two processes do."""
    proc = launch(tmp_path / "ddp", name=DPO_RECIPE, settings=DPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on 2 x cpu" in proc.stderr
    single = train(apply_overrides(registry.resolve(DPO_RECIPE).recipe, [
        *DPO, "train.batch_size=8", "train.grad_accum=1", f"train.output_dir={tmp_path / 'one'}"]))
    two, one = metrics(tmp_path / "ddp" / "demo-dpo"), metrics(single.path)
    assert [r["step"] for r in two] == [r["step"] for r in one]  # one writer, same records
    steps = [r for r in two if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # reference = start
    assert steps[-1]["reward_margin"] > 0  # the figures move: the comparison can fail
    for a, b in zip(two, one):
        for key in PREFERENCE_FIGURES:
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["step"], key)
    a, b = adapter(tmp_path / "ddp" / "demo-dpo"), adapter(single.path)
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5, rtol=1e-4), name

@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    proc = launch(out, "launch.strategy=fsdp")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "tiny-demo", proc


def test_fsdp_trains_the_same_adapter_as_ddp_with_sharded_state(fsdp_run, ddp_run):
    fsdp_path, proc = fsdp_run
    ddp_path, _ = ddp_run
    held, whole = re.search(r"on 2 x cpu \(FSDP2: this process holds ([\d.]+) MiB of "
                            r"([\d.]+) MiB of weights\)", " ".join(proc.stderr.split())).groups()
    assert float(held) == pytest.approx(float(whole) / 2, rel=0.02)
    fsdp, ddp = step_losses(fsdp_path), step_losses(ddp_path)
    assert [fsdp[s] for s in sorted(fsdp)] == pytest.approx([ddp[s] for s in sorted(ddp)],
                                                            rel=1e-5)
    a, b = adapter(fsdp_path), adapter(ddp_path)  # gathered from the shards, saved once
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5, rtol=1e-4), name
    # The optimizer shards were gathered into one whole state (so that any number of
    # processes can resume it): about the size of DDP's.
    ckpt, full = fsdp_path / "checkpoints" / "step-4", ddp_path / "checkpoints" / "step-4"
    assert not list(ckpt.glob("optimizer-rank*.pt"))
    whole = (full / "optimizer.pt").stat().st_size
    assert (ckpt / "optimizer.pt").stat().st_size == pytest.approx(whole, rel=0.25)


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


def test_fsdp_resumes_on_four_processes_a_run_checkpointed_on_two(fsdp_run, tmp_path):
    """Elastic resume, sharded: the whole optimizer state of step 2 is resharded over 4
    processes; grad_accum 2 -> 1 keeps the global batch (8 rows), so steps 3-4 train on the
    same rows and land on the same adapter."""
    path, _ = fsdp_run
    copy = tmp_path / "tiny-demo"
    shutil.copytree(path, copy)
    shutil.rmtree(copy / "checkpoints" / "step-4")
    proc = launch(tmp_path, "launch.strategy=fsdp", "--resume", nproc=4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "train.grad_accum 2 -> 1 keeps the global batch at 8 rows" in \
        " ".join(proc.stderr.split())
    assert "on 4 x cpu (FSDP2" in " ".join(proc.stderr.split())
    assert step_losses(copy) == pytest.approx(step_losses(path), rel=1e-5)
    a, b = adapter(copy), adapter(path)
    assert all(torch.allclose(a[n], b[n], atol=1e-5, rtol=1e-4) for n in a)
    state = json.loads((copy / "checkpoints" / "step-4" / "state.json").read_text())
    assert state["world_size"] == 4 and state["recipe"]["train"]["grad_accum"] == 1


def test_ddp_resumes_in_one_process_a_run_checkpointed_on_two(ddp_run, tmp_path):
    """Elastic resume, DDP: 2 processes x grad_accum 2 -> 1 process x grad_accum 4."""
    path, _ = ddp_run
    copy = tmp_path / "tiny-demo"
    shutil.copytree(path, copy)
    shutil.rmtree(copy / "checkpoints" / "step-4")
    recipe = apply_overrides(registry.resolve("tiny-demo").recipe,
                             [*SETTINGS, "train.batch_size=2", "train.grad_accum=2",
                              f"train.output_dir={tmp_path}"])
    train(recipe, resume=True)
    assert step_losses(copy) == pytest.approx(step_losses(path), rel=1e-5)
    a, b = adapter(copy), adapter(path)
    assert all(torch.allclose(a[n], b[n], atol=1e-5, rtol=1e-4) for n in a)


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
    held, whole = re.search(r"\(DeepSpeed ZeRO-3: this process holds ([\d.]+) MiB of "
                            r"([\d.]+) MiB of weights\)", " ".join(proc.stderr.split())).groups()
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


def test_a_process_that_receives_its_shards_builds_the_base_without_its_weights(tmp_path):
    """What each FSDP2 process but the main one builds (launch.efficient_loading): the base
    from its config alone, with no weights file to read, parameters on the meta device (no
    memory), the non-persistent buffers (rotary frequencies, never broadcast) computed
    exactly as a loaded model has them, and tied embeddings still tied."""
    from peftkit.model.loading import base_path, load_model
    from peftkit.recipe.schema import Model

    spec = Model("peftkit/tiny-llama-demo", arch="llama", tiny=True)
    full = load_model(base_path(spec), spec, torch.float32)
    config = json.loads((Path(base_path(spec)) / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    empty = load_model(str(tmp_path), spec, torch.float32, empty=True)  # no weights there
    assert {p.device.type for p in empty.parameters()} == {"meta"}
    assert empty.state_dict().keys() == full.state_dict().keys()
    buffers = dict(full.named_buffers())
    assert buffers and all(torch.equal(b, buffers[n]) for n, b in empty.named_buffers())
    assert empty.lm_head.weight is empty.model.embed_tokens.weight
    assert empty.config.use_cache is False


def test_the_trained_module_ties_embeddings_again_after_a_trip_to_meta(tmp_path):
    """accelerate's FSDP2 `prepare` with main-process loading moves the module it is given to
    the meta device (which unties tied embeddings on the main process only, whose weights are
    real) and calls its `tie_weights`: without it the processes shard different parameter
    sets and the first all-gather fails."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from peftkit.model.loading import attach_adapter, base_path
    from peftkit.recipe.schema import Lora, Model
    from peftkit.training.loss import TokenLoss

    config = AutoConfig.from_pretrained(base_path(Model("peftkit/tiny-llama-demo", arch="llama",
                                                        tiny=True)), tie_word_embeddings=True)
    module = TokenLoss(attach_adapter(AutoModelForCausalLM.from_config(config), Lora()))
    base = module.model.get_base_model()
    module.to("meta")
    assert base.lm_head.weight is not base.model.embed_tokens.weight
    module.tie_weights()
    assert base.lm_head.weight is base.model.embed_tokens.weight


@pytest.mark.parametrize("settings, alone", [
    ((), True), (("launch.efficient_loading=false",), False),
    (("model.quantize=nf4", "model.quant_storage=float32"), False),
    (("adapter.init=pissa",), False), (("adapter.use_dora=true",), False),
    (("train.objective=dpo", "data.format=auto", "train.eval_generate=0"), False)])
def test_only_the_main_process_loads_the_base_unless_every_process_needs_it(settings, alone):
    recipe = apply_overrides(registry.resolve("tiny-demo").recipe,
                             ["launch.strategy=fsdp", *settings])
    plugin = distributed.accelerator_args(recipe, "cpu")["fsdp_plugin"]
    assert plugin.cpu_ram_efficient_loading is alone


def test_the_launch_command_counts_processes_over_all_machines():
    """--nproc is per machine; accelerate's --num_processes is the total."""
    topology = launcher.Topology(2, 2, 1, "10.0.0.1", 29500)
    cmd, env = launcher.accelerate_command(topology, ["demo"], cuda=True)
    assert launcher.shown(cmd, env) == (
        "accelerate launch --num_processes 4 --num_machines 2 --machine_rank 1 "
        "--main_process_ip 10.0.0.1 --main_process_port 29500 --dynamo_backend no --multi_gpu "
        "-m peftkit train demo")
    with pytest.raises(UserError, match="--machine_rank 2: with --num_machines 2 it must be"):
        launcher.accelerate_command(launcher.Topology(1, 2, 2, "10.0.0.1"), ["demo"], True)
    with pytest.raises(UserError, match="needs --main_process_ip"):
        launcher.accelerate_command(launcher.Topology(1, 2, 1), ["demo"], True)


def two_machines(outs, *extra, settings=SETTINGS):
    """`peftkit train --nproc 1` as machine ranks 0 and 1 of two machines standing on this
    one (127.0.0.1), each launcher in its own session as on its own host; machine R trains
    into outs[R]. Returns the launchers and their stderr files."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    procs, logs = [], []
    for rank, out in enumerate(outs):
        logs.append(out.parent / f"machine{rank}.err")
        cmd = command(out, *extra, settings=settings, nproc=1) + [
            "--num_machines", "2", "--machine_rank", str(rank),
            "--main_process_ip", "127.0.0.1", "--main_process_port", str(port)]
        with logs[-1].open("w") as err:
            procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err,
                                          start_new_session=True))
    return procs, logs


def logged(run) -> bool:
    """Whether the run has logged a step yet."""
    try:
        return bool(step_losses(run))
    except (FileNotFoundError, json.JSONDecodeError):  # not yet, or a line being written
        return False


def finish(procs, timeout=300):
    try:
        return [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)


def test_two_machines_train_as_one_world_like_one_process(ddp_run, tmp_path):
    """--nproc 1 on each of 2 machines: world size 2, the same adapter as 2 processes on one
    machine (which equals 1 process with the same global batch), one writer."""
    procs, logs = two_machines([tmp_path, tmp_path])  # one shared filesystem
    assert finish(procs) == [0, 0], logs[0].read_text()[-3000:] + logs[1].read_text()[-3000:]
    err = [" ".join(log.read_text().split()) for log in logs]
    for rank in (0, 1):
        assert (f"accelerate launch --num_processes 2 --num_machines 2 --machine_rank {rank} "
                "--main_process_ip 127.0.0.1") in err[rank]
    assert "on 2 x cpu" in err[0]
    path, (ddp_path, _) = tmp_path / "tiny-demo", ddp_run
    losses, ddp = step_losses(path), step_losses(ddp_path)
    assert sorted(losses) == [1, 2, 3, 4]  # each step logged once: one writer
    assert [losses[s] for s in sorted(losses)] == pytest.approx([ddp[s] for s in sorted(ddp)],
                                                                rel=1e-5)
    assert sum(1 for r in metrics(path) if r.get("event") == "data") == 1
    a, b = adapter(path), adapter(ddp_path)
    assert all(torch.allclose(a[n], b[n], atol=1e-5, rtol=1e-4) for n in a)
    ckpt = path / "checkpoints" / "step-4"
    assert sorted(p.name for p in ckpt.glob("rng-rank*.pt")) == ["rng-rank0.pt", "rng-rank1.pt"]


def test_two_machines_stop_together_on_sigterm_and_resume_needs_the_checkpoint_on_each(
        tmp_path):
    """SIGTERM to machine 1's launcher alone (a scheduler taking that host): both machines
    finish the same step, checkpoint and exit 143. Resuming where machine 1 cannot see the
    checkpoint (no shared filesystem, not copied): both refuse in one line, exit 2."""
    long = [*SETTINGS, "train.max_steps=200", "train.save_every=0"]
    procs, logs = two_machines([tmp_path, tmp_path], settings=long)
    run = tmp_path / "tiny-demo"
    deadline = time.monotonic() + 300
    while not logged(run):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
            logs[0].read_text()[-3000:]
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)
    assert finish(procs) == [143, 143], logs[0].read_text()[-3000:]
    stopped = checkpoint.step_dirs(run / "checkpoints")
    assert len(stopped) == 1 and sorted(step_losses(run)) == list(
        range(1, checkpoint.step_of(stopped[0]) + 1))
    checkpoint.verify(stopped[0])
    assert "--num_machines 2 --machine_rank R" in logs[0].read_text()  # the resume command

    elsewhere = tmp_path / "machine1"  # what machine 1 sees there: no run directory
    procs, logs = two_machines([tmp_path, elsewhere], "--resume", settings=long)
    assert finish(procs) == [2, 2]
    lines = [[line for line in log.read_text().splitlines() if line.startswith("error: ")]
             for log in logs]
    assert "process(es) [1] cannot read it" in lines[0][0] and "shares" in lines[0][0]
    assert "no complete checkpoint" in lines[1][0]


def test_resume_on_another_number_of_processes_keeps_the_global_batch(tmp_path):
    """grad_accum is scaled to keep batch_size x grad_accum x processes; the data position
    is recounted in the new micro-batches; what cannot be kept is refused in one line."""
    recipe = apply_overrides(registry.resolve("tiny-demo").recipe,
                             ["train.batch_size=2", "train.grad_accum=3"])
    state = {"world_size": 2, "step": 5, "epoch": 1, "index": 6,
             "recipe": {"train": {"batch_size": 2, "grad_accum": 3}}}
    (tmp_path / "optimizer.pt").touch()
    adapted, notes = resuming.rebatch(tmp_path, state, recipe, 3)
    assert adapted.train.grad_accum == 2 and "grad_accum 3 -> 2" in notes[0]
    assert resuming.position(tmp_path, state, adapted, 3) == Position(1, 4)  # 24 rows in
    assert resuming.rebatch(tmp_path, state, recipe, 2) == (recipe, [])
    with pytest.raises(UserError, match="cannot be split over 4 processes"):
        resuming.rebatch(tmp_path, state, recipe, 4)
    with pytest.raises(UserError, match="falls inside a micro-batch of 3 processes"):
        resuming.position(tmp_path, {**state, "index": 1}, adapted, 3)


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
