"""Multi-process launch: `peftkit train NAME --nproc N` runs `accelerate launch -m peftkit ...`.

peftkit never starts workers itself: it builds the `accelerate launch` command (printed, so
users can reuse it), runs it, and returns the workers' exit status. Inside the workers
`peftkit train` sees the distributed environment and trains directly.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from peftkit.errors import UserError

# Set by the launcher for its workers: the main worker writes its exit code here, so that a
# bad-input error inside a worker still ends the whole command with exit code 2.
STATUS_ENV = "PEFTKIT_STATUS_FILE"


@dataclass(frozen=True)
class Topology:
    nproc: int
    num_machines: int = 1
    machine_rank: int = 0
    main_process_ip: str | None = None
    main_process_port: int | None = None
    config_file: str | None = None
    strategy: str = "ddp"
    zero_stage: int = 2


def in_distributed_worker() -> bool:
    """True inside a process started by accelerate launch / torchrun."""
    # torchrun sets LOCAL_RANK; every `accelerate launch` (even of one process) sets this.
    return "LOCAL_RANK" in os.environ or "ACCELERATE_DYNAMO_BACKEND" in os.environ


def check_machines(t: Topology) -> None:
    """Refuse, in one line, a multi-machine launch that could not rendezvous."""
    if not t.main_process_ip:
        raise UserError("--num_machines > 1 needs --main_process_ip (the address of "
                        "machine rank 0) and --machine_rank on every machine")
    if not 0 <= t.machine_rank < t.num_machines:
        raise UserError(f"--machine_rank {t.machine_rank}: with --num_machines "
                        f"{t.num_machines} it must be 0..{t.num_machines - 1}, one per machine")


def accelerate_command(topology: Topology, train_args: list[str], cuda: bool) -> tuple[list[str], dict]:
    """The `accelerate launch` argv and the extra environment for it."""
    t = topology
    cmd = [sys.executable, "-m", "peftkit.training.accelerate_launch"]  # = accelerate launch, quieter
    env: dict[str, str] = {}
    if t.config_file:
        cmd += ["--config_file", t.config_file]
    # accelerate's --num_processes is the total over all machines; --nproc is per machine.
    cmd += ["--num_processes", str(t.nproc * t.num_machines), "--num_machines",
            str(t.num_machines)]
    if t.num_machines > 1:
        check_machines(t)
        cmd += ["--machine_rank", str(t.machine_rank), "--main_process_ip", t.main_process_ip]
    if t.main_process_port:
        cmd += ["--main_process_port", str(t.main_process_port)]
    if not t.config_file:
        cmd += ["--dynamo_backend", "no"]
        if t.strategy == "deepspeed":
            # accelerate's DeepSpeed launcher starts N workers on CPU too (its --multi_gpu
            # cannot be combined with it, and ACCELERATE_USE_CPU would switch DeepSpeed off).
            cmd += ["--use_deepspeed", "--zero_stage", str(t.zero_stage)]
            if not cuda:
                env["DS_ACCELERATOR"] = "cpu"  # what DeepSpeed would guess, with a warning
                cmd += ["--mixed_precision", "no"]
        elif t.strategy == "fsdp" and cuda and t.nproc * t.num_machines == 1:
            # One GPU: FSDP still needs the distributed environment accelerate sets up for it
            # (the wrapping and sharding then run with a world size of one).
            cmd += ["--use_fsdp", "--fsdp_version", "2"]
        elif t.nproc * t.num_machines > 1:
            # On CPU, `--cpu --num_processes N` starts ONE process; `--multi_gpu` with
            # ACCELERATE_USE_CPU starts N real gloo workers.
            cmd += ["--multi_gpu"]
            if not cuda:
                env["ACCELERATE_USE_CPU"] = "true"
                cmd += ["--mixed_precision", "no"]
    cmd += ["-m", "peftkit", "train", *train_args]
    return cmd, env


def shown(cmd: list[str], env: dict) -> str:
    prefix = " ".join(f"{k}={v}" for k, v in env.items())
    argv = ["accelerate", "launch", *cmd[3:]]
    return (prefix + " " if prefix else "") + shlex.join(argv)


def run(topology: Topology, train_args: list[str], cuda: bool) -> int:
    """Run the workers; return the main worker's exit code (2 for its bad-input errors)."""
    cmd, env = accelerate_command(topology, train_args, cuda)
    print(f"launching: {shown(cmd, env)}", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="peftkit-launch-") as tmp:
        status = Path(tmp) / "status"
        proc = subprocess.Popen(cmd, env={**os.environ, **env, STATUS_ENV: str(status)})
        # Ctrl-C reaches the workers too (same process group): they finish the step and
        # checkpoint, so wait for them instead of dying first. A SIGTERM sent to this process
        # alone (a scheduler pre-empting the job) is passed on to them.
        previous = signal.signal(signal.SIGTERM, lambda *_: proc.send_signal(signal.SIGTERM))
        try:
            while True:
                try:
                    proc.wait()
                    break
                except KeyboardInterrupt:
                    continue
        finally:
            signal.signal(signal.SIGTERM, previous)
        if status.is_file():
            return int(status.read_text().strip() or 1)
        return 0 if proc.returncode == 0 else 1


def report_status(code: int) -> None:
    """Called by a worker on exit: each machine's main worker (LOCAL_RANK 0) tells its own
    launcher how it ended, so every machine's `peftkit train` exits like the run did."""
    path = os.environ.get(STATUS_ENV)
    if path and os.environ.get("LOCAL_RANK", "0") == "0":
        Path(path).write_text(str(code))
