"""Checkpoints: adapter + optimizer + scheduler + RNG + data position, written crash-safely.

Layout of `checkpoints/step-N/`: `adapter/` (PEFT format), `optimizer.pt`, `scheduler.pt`,
`rng-rank<R>.pt` (one per process), `state.json` (step, data position), and `manifest.json`
(every file with its size and sha256), written last. A checkpoint is complete iff its
manifest exists and matches; it is built under a temporary name and renamed into place, so a
crash at any moment leaves either the old set of checkpoints or the new one.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from peftkit.batching import Position
from peftkit.errors import UserError

MANIFEST = "manifest.json"


def step_dirs(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if (p / MANIFEST).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {"python": random.getstate(), "numpy": (np_state[0], np_state[1].tolist(),
                                                    *np_state[2:]),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(root: Path, step: int, position: Position, peft_model, optimizer, scheduler,
         accelerator, keep: int, state_dict: dict | None = None) -> Path:
    """Write checkpoint `step` under `root` (all processes call this; each writes its RNG)."""
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}"
    main = accelerator.is_main_process
    sharded = state_dict is not None
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(rng_state(), tmp / f"rng-rank{accelerator.process_index}.pt")
    if sharded:  # FSDP: each process holds (and writes) its own shard of the optimizer state
        torch.save(optimizer.state_dict(), tmp / f"optimizer-rank{accelerator.process_index}.pt")
    if main:
        peft_model.save_pretrained(tmp / "adapter", state_dict=state_dict)
        if not sharded:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "state.json").write_text(json.dumps(
            {"step": step, "epoch": position.epoch, "index": position.index,
             "world_size": accelerator.num_processes}))
    accelerator.wait_for_everyone()
    if main:
        files = {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
                 for p in sorted(tmp.rglob("*")) if p.is_file()}
        (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=1))
        if final.exists():  # a stale copy of this step from an earlier, overwritten attempt
            shutil.rmtree(final)
        tmp.rename(final)
        # Only now, with the new checkpoint complete, drop the oldest ones.
        for old in step_dirs(root)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def verify(path: Path) -> dict:
    """The checkpoint's state.json, after checking every file against the manifest."""
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        raise UserError(f"{path}: incomplete checkpoint (no {MANIFEST}); resume from an "
                        "earlier one with --resume PATH")
    try:
        manifest = json.loads(manifest_file.read_text())
        for name, meta in manifest["files"].items():
            file = path / name
            if not file.is_file() or file.stat().st_size != meta["bytes"] \
                    or _sha256(file) != meta["sha256"]:
                raise UserError(f"{file}: corrupt or truncated checkpoint file (size or "
                                "checksum differs from the manifest); resume from an earlier "
                                "checkpoint with --resume PATH")
        return json.loads((path / "state.json").read_text())
    except (json.JSONDecodeError, KeyError) as exc:
        raise UserError(f"{path}: unreadable checkpoint metadata ({exc}); resume from an "
                        "earlier checkpoint with --resume PATH") from exc


def load(path: Path, peft_model, optimizer, scheduler, accelerator) -> tuple[int, Position]:
    """Restore a checkpoint written by `save`; returns (step, data position)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = verify(path)
    if state["world_size"] != accelerator.num_processes:
        raise UserError(f"{path} was written by {state['world_size']} processes, this run has "
                        f"{accelerator.num_processes}; resume with the same number")
    weights = load_file(path / "adapter" / "adapter_model.safetensors")
    set_peft_model_state_dict(peft_model, weights)
    optim_file = path / "optimizer.pt"
    if not optim_file.is_file():  # written sharded, one file per process (FSDP)
        optim_file = path / f"optimizer-rank{accelerator.process_index}.pt"
    optimizer.load_state_dict(torch.load(optim_file, weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    set_rng_state(torch.load(path / f"rng-rank{accelerator.process_index}.pt",
                             weights_only=True))
    return state["step"], Position(state["epoch"], state["index"])
