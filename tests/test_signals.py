"""Stopping: SIGINT/SIGTERM finish the step, checkpoint and exit 130/143 with the resume command;
SIGKILL in the middle of a checkpoint write loses nothing but that checkpoint."""

import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import threading
import time
import types
from pathlib import Path

import pytest
import torch

from peftkit.training import checkpoint
from peftkit.training import signals
from peftkit.cli.app import main

ARGS = ["train", "tiny-demo", "model.tiny_size=xs", "data.eval=", "data.eval_size=0",
        "train.eval_generate=0", "train.log_every=1", "train.warmup_steps=0",
        "data.max_samples=64", "train.batch_size=4"]


def logged_steps(run: Path) -> list[int]:
    rows = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written right now
            pass
    return [r["step"] for r in rows if "loss" in r]


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def send_after_step(run: Path, step: int, signum: int) -> threading.Thread:
    """From another thread: send `signum` to this process once `step` is logged."""
    def watch():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if (run / "metrics.jsonl").is_file() and step in logged_steps(run):
                os.kill(os.getpid(), signum)
                return
            time.sleep(0.005)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("signum, code, resume", [(signal.SIGTERM, 143, True),
                                                  (signal.SIGINT, 130, False)])
def test_a_signal_checkpoints_and_prints_the_resume_command(tmp_path, capsys, signum, code,
                                                            resume):
    run = tmp_path / "runs" / "tiny-demo"
    argv = [*ARGS, f"train.output_dir={tmp_path / 'runs'}", "train.max_steps=12"]
    received = []
    previous = signal.signal(signum, lambda *a: received.append(a))  # if it came too late
    try:
        thread = send_after_step(run, 3, signum)
        rc = main(argv)
        thread.join(timeout=5)
        out, err = capsys.readouterr()
        assert signal.getsignal(signum) is not None and received == []
        restored = signal.getsignal(signum)
    finally:
        signal.signal(signum, previous)
    assert restored.__name__ == "<lambda>"  # our handler was put back after the loop
    assert rc == code, err
    stopped = logged_steps(run)[-1]
    assert 3 <= stopped < 12
    name = signal.Signals(signum).name
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"stopped by {name} after step {stopped}; checkpoint "
                           f"{run / 'checkpoints' / f'step-{stopped}'} is complete. Resume with: ")
    assert checkpoint.verify(run / "checkpoints" / f"step-{stopped}")["step"] == stopped
    assert not (run / "adapter").exists()
    if not resume:
        return
    # The printed command continues the run to the end.
    command = shlex.split(line.split("Resume with: ", 1)[1])
    assert command[:2] == ["peftkit", "train"] and command[-1] == "--resume"
    assert main(command[1:]) == 0, capsys.readouterr().err
    assert logged_steps(run) == list(range(1, 13))
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


@pytest.fixture
def sigint_disposition():
    """Set SIGINT's disposition as a parent process might have left it, restored afterwards:
    tests must not depend on how they were started (`nohup make test &` in a script runs
    them with SIGINT ignored)."""
    before = signal.getsignal(signal.SIGINT)
    yield lambda handler: signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGINT, before)


def test_a_second_signal_acts_at_once_and_handlers_are_restored(sigint_disposition):
    sigint_disposition(signal.default_int_handler)  # Python's own, whatever the parent set
    stop = signals.StopRequest()
    with pytest.raises(KeyboardInterrupt):
        for step in stop.steps(range(1, 10)):
            assert signal.getsignal(signal.SIGINT) == stop._handle
            if step == 2:
                signal.raise_signal(signal.SIGINT)  # first: only noted
                assert stop.signum == signal.SIGINT
            if step == 3:
                signal.raise_signal(signal.SIGINT)  # second: the previous handler acts
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_ignored_signal_stays_ignored(sigint_disposition):
    sigint_disposition(signal.SIG_IGN)  # as `cmd &` in a shell script starts cmd
    stop = signals.StopRequest()
    for step in stop.steps(range(3)):
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) == stop._handle
        signal.raise_signal(signal.SIGINT)
    assert stop.signum is None and signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_signal_tests_pass_when_started_with_sigint_ignored():
    """`nohup make test &` from a script: pytest starts with SIGINT ignored."""
    child = subprocess.run(
        [sys.executable, "-c", "import signal, sys, pytest; signal.signal(signal.SIGINT, "
         "signal.SIG_IGN); sys.exit(pytest.main(sys.argv[1:]))", "-q", "-p", "no:cacheprovider",
         f"{__file__}::test_a_second_signal_acts_at_once_and_handlers_are_restored",
         f"{__file__}::test_an_ignored_signal_stays_ignored"],
        capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert child.returncode == 0, child.stdout[-2000:] + child.stderr[-2000:]


def test_handlers_are_restored_when_the_loop_raises():
    before = {s: signal.getsignal(s) for s in signals.SIGNALS}
    with pytest.raises(ZeroDivisionError):
        for step in signals.StopRequest().steps(range(3)):
            1 / step
    assert {s: signal.getsignal(s) for s in signals.SIGNALS} == before


def test_every_process_stops_after_the_same_step():
    """A signal seen by one process stops all of them: the flags are summed over processes."""
    def accelerator(other_ranks: list[float]):
        return types.SimpleNamespace(
            num_processes=2, device=torch.device("cpu"),
            reduce=lambda t, reduction: t + torch.tensor(other_ranks))

    stop = signals.StopRequest()
    assert stop.requested(accelerator([0.0, 0.0])) is None
    assert stop.requested(accelerator([0.0, 1.0])) == signal.SIGTERM  # only the other saw it
    stop.signum = signal.SIGINT
    assert stop.requested(accelerator([0.0, 0.0])) == signal.SIGINT
    assert stop.requested(accelerator([0.0, 1.0])) == signal.SIGTERM  # SIGTERM wins


# A real process, SIGKILLed while it writes a checkpoint: every file of step 4 is written, its
# manifest is not (the child stalls there, so the kill lands inside the write every time).
CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from peftkit.training import checkpoint
    from peftkit.cli.app import main

    marker, stall_at = Path(sys.argv[1]), int(sys.argv[2])
    publish = checkpoint._publish

    def publish_slowly(tmp, final):
        if checkpoint.step_of(final) == stall_at:
            marker.write_text(str(tmp))
            time.sleep(600)
        publish(tmp, final)

    checkpoint._publish = publish_slowly
    raise SystemExit(main(sys.argv[3:]))
""")


def test_sigkill_during_a_checkpoint_write_then_resume(tmp_path, capsys):
    argv = [*ARGS, "train.max_steps=6", "train.save_every=1", "train.keep_checkpoints=2"]
    marker = tmp_path / "stalled"
    runs = tmp_path / "runs"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(marker), "4", *argv, f"train.output_dir={runs}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), child.stderr.read().decode() if child.poll() is not None else ""
    finally:
        child.kill()  # SIGKILL: no handler, no cleanup
        child.wait()
    assert child.returncode == -signal.SIGKILL
    checkpoints = runs / "tiny-demo" / "checkpoints"
    partial = Path(marker.read_text())
    assert partial == checkpoints / ".tmp-step-4" and (partial / "state.json").is_file()
    assert not (partial / checkpoint.MANIFEST).exists()
    assert [p.name for p in checkpoint.step_dirs(checkpoints)] == ["step-2", "step-3"]
    assert checkpoint.verify(checkpoints / "step-3")["step"] == 3

    # The killed process had logged step 4 before it began the checkpoint of step 4.
    killed = losses(runs / "tiny-demo")
    assert sorted(killed) == [1, 2, 3, 4]

    # --resume continues from step 3 and cleans up; step 4 again gives the same loss.
    assert main([*argv, f"train.output_dir={runs}", "--resume"]) == 0, capsys.readouterr().err
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-5", "step-6"]
    resumed = losses(runs / "tiny-demo")
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    assert [resumed[s] for s in (1, 2, 3)] == [killed[s] for s in (1, 2, 3)]
    assert resumed[4] == pytest.approx(killed[4], rel=1e-6)  # another process: not bitwise
    assert (runs / "tiny-demo" / "adapter" / "adapter_model.safetensors").is_file()
