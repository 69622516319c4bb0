"""Checkpoints and resume: exact continuation, refusal of other recipes, crash safety, and a
run that diverges (docs/reliability.md). Basic resume equality is in test_train.py; these
cases add what it does not cover: accumulation, dropout RNG, a full warmup + cosine schedule,
stops mid-epoch on both sides of an epoch boundary, and crashes inside `checkpoint.save`."""

import errno
import json
import os
import shutil
import signal
import types
from pathlib import Path

import pytest
import torch

from peftkit.training import checkpoint
from peftkit.training import signals
from peftkit.data.batching import Position
from peftkit.cli.app import main
from peftkit.data.sources import resolve_source
from peftkit.errors import RunError

# 24 rows, batch 4 x accumulation 2: 6 micro-batches, 3 optimizer steps per epoch.
GEOMETRY = ["data.max_samples=24", "train.batch_size=4", "train.grad_accum=2"]
ARGS = ["train", "tiny-demo", "model.tiny_size=xs", "data.eval=", "data.eval_size=0",
        "train.eval_generate=0", "train.log_every=1", "train.eval_every=0",
        "adapter.dropout=0.1", "train.lr=3e-3", "train.warmup_steps=2", "train.scheduler=cosine",
        "train.max_steps=8", "train.save_every=0", *GEOMETRY]


def cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def loss_by_step(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert len(steps) == len(set(steps)), steps  # a resumed step is never logged twice
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def adapter_weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run / "adapter" / "adapter_model.safetensors")


REQUESTED = signals.StopRequest.requested


def stop_at(monkeypatch, steps_into_run: int, signum=signal.SIGTERM) -> None:
    """Deliver a real `signum` to this process during the run's `steps_into_run`-th step,
    just before the loop polls for it (deterministic, unlike a timer)."""

    def requested(self, accelerator):
        self.polls = getattr(self, "polls", 0) + 1
        if self.polls == steps_into_run:
            signal.raise_signal(signum)
        return REQUESTED(self, accelerator)

    monkeypatch.setattr(signals.StopRequest, "requested", requested)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted reference run (8 steps, almost 3 epochs), with a token in the
    environment that must not reach any file of the run."""
    out = tmp_path_factory.mktemp("straight")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_TOKEN", "hf_doNotLeakThisToken123")
        assert main([*ARGS, f"train.output_dir={out}"]) == 0
    return out / "tiny-demo"


def test_stopped_twice_and_resumed_equals_uninterrupted(tmp_path, capsys, monkeypatch,
                                                        straight):
    runs = tmp_path / "runs"
    argv = [*ARGS, f"train.output_dir={runs}"]
    handler = signal.getsignal(signal.SIGTERM)
    # Stop after step 2 (epoch 0; the boundary to epoch 1 is crossed after resuming) ...
    stop_at(monkeypatch, 2)
    rc, _, err = cli(capsys, *argv)
    assert rc == 143, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("stopped by SIGTERM after step 2; checkpoint ")
    assert line.endswith("Resume with: peftkit train tiny-demo " + " ".join(argv[2:]) + " --resume")
    assert [p.name for p in checkpoint.step_dirs(runs / "tiny-demo" / "checkpoints")] == ["step-2"]
    assert signal.getsignal(signal.SIGTERM) is handler  # the previous handler is back
    # ... then after step 5 (in the middle of epoch 1: the order of epoch 1 must be replayed) ...
    stop_at(monkeypatch, 3)
    rc, _, err = cli(capsys, *argv, "--resume")
    assert rc == 143 and "after step 5" in err, err
    state = checkpoint.verify(runs / "tiny-demo" / "checkpoints" / "step-5")
    assert (state["epoch"], state["index"]) == (1, 4)
    # ... and finish.
    monkeypatch.undo()
    rc, _, err = cli(capsys, *argv, "--resume")
    assert rc == 0, err

    expected, got = loss_by_step(straight), loss_by_step(runs / "tiny-demo")
    assert sorted(got) == list(range(1, 9))
    assert got == expected  # bitwise: same floats at every step
    a, b = adapter_weights(straight), adapter_weights(runs / "tiny-demo")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_no_environment_token_in_run_files(straight):
    assert os.environ.get("HF_TOKEN") != "hf_doNotLeakThisToken123"
    for file in straight.rglob("*"):
        if file.is_file():
            assert b"hf_doNotLeakThisToken123" not in file.read_bytes(), file


def test_resume_allows_and_reports_harmless_changes(tmp_path, capsys, straight):
    moved = tmp_path / "elsewhere"
    shutil.copytree(straight, moved / "tiny-demo")  # the user moved the run directory
    rc, out, err = cli(capsys, *ARGS, f"train.output_dir={moved}", "train.max_steps=9",
                       "train.log_every=3", "--resume")
    assert rc == 0, err
    said = " ".join((out + err).split())
    assert "resuming with changed settings (allowed)" in said
    for change in ("train.max_steps: 8 -> 9", "train.log_every: 1 -> 3", "train.output_dir"):
        assert change in said, (change, said)
    got = loss_by_step(moved / "tiny-demo")
    assert max(got) == 9 and {k: got[k] for k in range(1, 9)} == loss_by_step(straight)
    # recipe.json now holds the recipe the run finished with, and says it resumed.
    doc = json.loads((moved / "tiny-demo" / "recipe.json").read_text())
    before = json.loads((straight / "recipe.json").read_text())
    assert doc["recipe"]["train"]["max_steps"] == 9 and doc["created"] == before["created"]
    assert [r["from_step"] for r in doc["resumed"]] == [8]


def test_resume_from_another_runs_checkpoint_starts_a_new_run_directory(tmp_path, capsys,
                                                                        straight):
    before = {p: p.stat().st_mtime_ns for p in straight.rglob("*")}
    rc, _, err = cli(capsys, *ARGS, f"train.output_dir={tmp_path}", "name=branch",
                     "train.max_steps=9", "--resume", straight / "checkpoints" / "step-8")
    assert rc == 0, err
    branch = tmp_path / "branch"
    assert json.loads((branch / "recipe.json").read_text())["name"] == "branch"
    assert sorted(loss_by_step(branch)) == [9]
    assert [p.name for p in checkpoint.step_dirs(branch / "checkpoints")] == ["step-9"]
    assert {p: p.stat().st_mtime_ns for p in straight.rglob("*")} == before  # untouched


def test_resume_refuses_other_training_data(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rows = Path(resolve_source("peftkit:data/sort_reverse/train.jsonl")).read_text()
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(rows.splitlines(keepends=True)[:24]))
    argv = [*ARGS, "data.train=rows.jsonl", "train.output_dir=runs", "train.max_steps=2"]
    assert cli(capsys, *argv)[0] == 0
    data.write_text(data.read_text().replace("Sort: ", "Sort these: ", 1))  # same file, edited
    rc, _, err = cli(capsys, *argv, "--resume")
    assert rc == 2 and err.count("\n") == 1
    assert "training data differ from the checkpoint's" in err


# ---------------------------------------------------------------------------------------------
# Crashes inside checkpoint.save: whatever point a crash hits, the newest complete checkpoint
# verifies and restores, and the next start cleans up what the crash left.

class Crash(BaseException):
    """Stands for the process dying at this point (not an Exception: nothing handles it)."""


ONE_PROCESS = types.SimpleNamespace(is_main_process=True, process_index=0, num_processes=1,
                                    wait_for_everyone=lambda: None, scaler=None,
                                    device=torch.device("cpu"), distributed_type="NO")


@pytest.fixture()
def small_state():
    """A small peft model, optimizer and scheduler; `advance()` takes one optimizer step."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    model = get_peft_model(net, LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights=False))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))

    def advance():
        model(torch.randn(4, 8)).square().sum().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()

    def save(root, step, keep=2):
        return checkpoint.save(root, step, Position(0, step), model, optimizer, scheduler,
                               ONE_PROCESS, keep, extra={"note": "test"})

    def weights():
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    return types.SimpleNamespace(model=model, optimizer=optimizer, scheduler=scheduler,
                                 advance=advance, save=save, weights=weights)


def _nth_call_crashes(monkeypatch, owner, name, n, error=Crash("killed")):
    original = getattr(owner, name)
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise error
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)


CRASH_POINTS = {
    # name: (object, attribute, which call crashes)
    "first file (rng)": (checkpoint.torch, "save", 1),
    "adapter written, optimizer not": (checkpoint.torch, "save", 2),
    "while hashing for the manifest": (checkpoint, "_sha256", 3),
    "manifest written, not renamed": (Path, "rename", 1),
    "renamed, older not yet pruned": (checkpoint.shutil, "rmtree", 2),
}


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_a_crash_anywhere_in_save_leaves_the_newest_complete_checkpoint(tmp_path, monkeypatch,
                                                                        small_state, point):
    root = tmp_path / "checkpoints"
    kept = {}
    for step in (1, 2):
        small_state.advance()
        small_state.save(root, step)
        kept[step] = small_state.weights()
    small_state.advance()
    kept[3] = small_state.weights()
    with monkeypatch.context() as mp:
        _nth_call_crashes(mp, *CRASH_POINTS[point])
        with pytest.raises(Crash):
            small_state.save(root, 3)
    newest = checkpoint.step_dirs(root)[-1]
    step = checkpoint.verify(newest)["step"]
    assert step in (2, 3)
    # Restore into a freshly changed model: it gets exactly the weights of that step.
    small_state.advance()
    checkpoint.load_adapter(newest, small_state.model)
    loaded, position = checkpoint.load(newest, small_state.optimizer, small_state.scheduler,
                                       ONE_PROCESS)
    assert (loaded, position) == (step, Position(0, step))
    for name, value in small_state.weights().items():
        assert torch.equal(value, kept[step][name]), name
    # The next start removes the leftovers; saving step 3 again then works and prunes.
    checkpoint.clean_stale(root)
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".")) == []
    small_state.save(root, 3)
    assert [p.name for p in checkpoint.step_dirs(root)] == ["step-2", "step-3"]


def test_a_crash_while_replacing_a_checkpoint_of_the_same_step(tmp_path, monkeypatch,
                                                               small_state):
    """A run resumed from step 1 saves step 2 again over an abandoned step 2: a crash
    between moving the old copy aside and renaming the new one loses nothing."""
    root = tmp_path / "checkpoints"
    small_state.advance()
    small_state.save(root, 2)
    old = small_state.weights()
    small_state.advance()
    with monkeypatch.context() as mp:
        _nth_call_crashes(mp, Path, "rename", 2)
        with pytest.raises(Crash):
            small_state.save(root, 2)
    assert not (root / "step-2").exists()
    checkpoint.clean_stale(root)  # puts the moved-aside copy back
    assert [p.name for p in root.iterdir()] == ["step-2"]
    checkpoint.load_adapter(root / "step-2", small_state.model)
    checkpoint.load(root / "step-2", small_state.optimizer, small_state.scheduler, ONE_PROCESS)
    assert all(torch.equal(v, old[n]) for n, v in small_state.weights().items())


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch,
                                                              small_state):
    root = tmp_path / "checkpoints"
    small_state.advance()
    small_state.save(root, 1)
    small_state.advance()
    with monkeypatch.context() as mp:
        _nth_call_crashes(mp, checkpoint.torch, "save", 2,
                          OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
        with pytest.raises(RunError) as caught:
            small_state.save(root, 2)
    message = str(caught.value)
    assert "\n" not in message and caught.value.exit_code == 1 and caught.value.resumable
    assert "no space left on device" in message and str(root / "step-1") in message
    assert sorted(p.name for p in root.iterdir()) == ["step-1"]  # partial copy removed
    checkpoint.verify(root / "step-1")


def test_later_checkpoints_of_an_abandoned_continuation_are_replaced(tmp_path, small_state):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        small_state.advance()
        small_state.save(root, step, keep=3)
    # resumed from step-1 (say): its step 2 replaces the old step 2, and step 3 goes
    small_state.save(root, 2, keep=3)
    assert [p.name for p in checkpoint.step_dirs(root)] == ["step-1", "step-2"]


# ---------------------------------------------------------------------------------------------
# Divergence: stop with the step named, keep the last good checkpoint, no final adapter.

def test_divergence_stops_with_the_step_and_keeps_good_checkpoints(tmp_path, capsys):
    # lr=1e30: step 1 is a finite but huge update; the forward of step 2 overflows.
    runs = tmp_path / "runs"
    rc, _, err = cli(capsys, *ARGS, f"train.output_dir={runs}", "train.lr=1e30",
                     "train.warmup_steps=0", "train.save_every=1", "adapter.dropout=0")
    assert rc == 1 and "Traceback" not in err, err
    last = err.splitlines()[-1]  # the progress lines of the steps taken come before it
    assert last.startswith("error: loss or gradients became non-finite at step 2; the last "
                           f"good checkpoint is {runs / 'tiny-demo' / 'checkpoints' / 'step-1'}"), err
    run = runs / "tiny-demo"
    assert not (run / "adapter").exists()  # no final adapter
    assert [p.name for p in checkpoint.step_dirs(run / "checkpoints")] == ["step-1"]
    checkpoint.verify(run / "checkpoints" / "step-1")
    weights = adapter_weights(run / "checkpoints" / "step-1")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_non_finite_adapter_weights_are_never_checkpointed(tmp_path):
    from peftkit.training.loop import TrainingDiverged, _check_finite

    _check_finite(ONE_PROCESS, [torch.zeros(3), torch.ones(2, 2)], 7, tmp_path)  # passes
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(TrainingDiverged, match="adapter weights became non-finite at step 7"):
            _check_finite(ONE_PROCESS, [torch.zeros(3), torch.tensor([[1.0, bad]])], 7, tmp_path)
