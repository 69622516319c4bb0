"""Checkpoints: adapter + optimizer + scheduler + scaler + RNG + data position, crash-safe.

Layout of `checkpoints/step-N/`: `adapter/` (PEFT format), `optimizer.pt` (the whole
optimizer state, gathered from the shards under FSDP; DeepSpeed ZeRO instead writes one
`optimizer-rank<R>.pt` per process), `scheduler.pt`, `scaler.pt` (fp16 only),
`rng-rank<R>.pt` (one per process), `state.json` (step, data position, world size, plus what
the caller adds: the recipe and a data fingerprint), and `manifest.json` (every file with its
size and sha256), written last.

The main process (global rank 0) writes all of it, so machines need no shared filesystem to
checkpoint (except under DeepSpeed, whose partitions each process writes). A whole optimizer
state is what lets a run resume on another number of processes (resume.py).

A checkpoint is complete iff its manifest exists and matches. It is built under
`.tmp-step-N`, flushed to disk, and renamed into place; only then are older checkpoints
deleted. So a crash (or SIGKILL, or a full disk) at any moment leaves the newest complete
checkpoint intact, plus at most a temporary directory that the next start removes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import pickletools
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

from peftkit.data.batching import Position
from peftkit.errors import RunError, UserError

MANIFEST = "manifest.json"
STATE_KEYS = ("step", "epoch", "index", "world_size")
# Files every complete checkpoint has (besides the optimizer state, whole or sharded).
REQUIRED = ("state.json", "scheduler.pt", "rng-rank0.pt", "adapter/adapter_model.safetensors")
EARLIER = "resume from an earlier checkpoint with --resume PATH"


def step_of(path: Path) -> int:
    """N of a `step-N` directory (-1 for any other name)."""
    number = path.name.removeprefix("step-")
    return int(number) if path.name.startswith("step-") and number.isdigit() else -1


def step_dirs(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if step_of(p) >= 0 and (p / MANIFEST).is_file()]
    return sorted(found, key=step_of)


def clean_stale(root: Path) -> None:
    """Remove what a crash during `save` can leave behind (main process, at start)."""
    if not root.is_dir():
        return
    for old in root.glob(".old-step-*"):
        # A crash between the two renames that replace a checkpoint of the same step.
        final = root / old.name.removeprefix(".old-")
        if not final.exists() and (old / MANIFEST).is_file():
            old.rename(final)
        else:
            shutil.rmtree(old, ignore_errors=True)
    for tmp in root.glob(".tmp-step-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def _sha256(path: Path, sync: bool = False) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
        if sync:  # on disk before the manifest vouches for it
            os.fsync(f.fileno())
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (best effort: not every platform can open a dir)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
         accelerator, keep: int, state_dict: dict | None = None,
         extra: dict | None = None, optimizer_state: dict | None = None) -> Path:
    """Write checkpoint `step` under `root` (all processes call this).

    `state_dict` is the full adapter state gathered from sharded weights (None where every
    process holds them); `optimizer_state` the whole optimizer state gathered from FSDP
    shards (None: `optimizer.state_dict()`); `extra` goes into state.json. A failed write
    (disk full, permissions) discards the temporary directory and raises RunError; earlier
    checkpoints are untouched.
    """
    from peftkit.training.distributed import uses_deepspeed

    final, tmp = root / f"step-{step}", root / f".tmp-step-{step}"
    main, rank = accelerator.is_main_process, accelerator.process_index
    partitioned = uses_deepspeed(accelerator)  # ZeRO: each process writes its partition
    scaler = getattr(accelerator, "scaler", None)  # fp16 only
    rngs = _gather(accelerator, rng_state())  # every process's, written by the main one

    def start():
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)

    def write():
        if partitioned:
            torch.save(optimizer.state_dict(), tmp / f"optimizer-rank{rank}.pt")
        if not main:
            return
        for r, rng in enumerate(rngs):
            torch.save(rng, tmp / f"rng-rank{r}.pt")
        peft_model.save_pretrained(tmp / "adapter", state_dict=state_dict)
        if not partitioned:
            torch.save(optimizer_state if optimizer_state is not None
                       else optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        if scaler is not None:
            torch.save(scaler.state_dict(), tmp / "scaler.pt")
        (tmp / "state.json").write_text(json.dumps(
            {"step": step, "epoch": position.epoch, "index": position.index,
             "world_size": accelerator.num_processes, **(extra or {})}))

    def publish():
        if main:
            _publish(tmp, final)

    for stage in (start, write, publish):
        _together(accelerator, stage, root, tmp, step)
    if main:  # only now, with the new checkpoint complete, drop older ones
        _prune(root, step, keep)
    accelerator.wait_for_everyone()
    return final


def _gather(accelerator, item) -> list:
    """`item` of every process, in rank order (on every process)."""
    if accelerator.num_processes == 1:
        return [item]
    from accelerate.utils import gather_object  # accelerate is loaded already

    return gather_object([item])


def _together(accelerator, stage, root: Path, tmp: Path, step: int) -> None:
    """Run one stage of `save` on every process; if it failed on any of them, all of them
    raise (none is left waiting at a barrier) and the temporary directory goes."""
    error = None
    try:
        stage()
    except OSError as exc:
        error = exc
    failed = error is not None
    if accelerator.num_processes > 1:  # the reduce doubles as the barrier between stages
        flag = torch.tensor([float(failed)], device=accelerator.device)
        failed = accelerator.reduce(flag, reduction="sum").item() > 0
    if not failed:
        return
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    raise _write_error(error, root, step) from error


def _write_error(error: OSError | None, root: Path, step: int) -> RunError:
    found = step_dirs(root)
    intact = f"the newest complete checkpoint {found[-1]} is intact" if found else \
        "no earlier checkpoint exists"
    if error is None:
        what = "another process failed to write its part"
    elif error.errno == errno.ENOSPC:
        what = "no space left on device"
    else:
        what = f"{error.strerror or error}{f' ({error.filename})' if error.filename else ''}"
    exc = RunError(f"cannot write checkpoint step-{step} in {root}: {what}; the partial "
                   f"checkpoint was removed and {intact}. Free disk space (or fix the "
                   "directory), then continue")
    exc.resumable = bool(found)
    return exc


def _publish(tmp: Path, final: Path) -> None:
    """Seal `tmp` with its manifest and rename it to `final` (replacing an older copy of the
    same step, left by a run that resumed from an earlier checkpoint)."""
    files = {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": _sha256(p, True)}
             for p in sorted(tmp.rglob("*")) if p.is_file()}
    with (tmp / MANIFEST).open("w") as f:
        json.dump({"step": step_of(final), "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    old = final.with_name(f".old-{final.name}")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    _fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def _prune(root: Path, step: int, keep: int) -> None:
    """Keep the newest `keep` checkpoints up to `step`. Checkpoints after `step` belong to a
    continuation this run abandoned when it resumed from an earlier one."""
    complete = step_dirs(root)
    earlier = [p for p in complete if step_of(p) < step]
    later = [p for p in complete if step_of(p) > step]
    for old in later + earlier[:max(0, len(earlier) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)


def verify(path: Path) -> dict:
    """The checkpoint's state.json, after checking every file against the manifest."""
    manifest_file = path / MANIFEST
    if not path.is_dir():
        raise UserError(f"{path}: no such checkpoint directory; {EARLIER}")
    if not manifest_file.is_file():
        raise UserError(f"{path}: incomplete checkpoint (no {MANIFEST}); {EARLIER}")
    try:
        files = json.loads(manifest_file.read_text())["files"]
        listed = set(files)
        missing = [name for name in REQUIRED if name not in listed]
        if not {"optimizer.pt", "optimizer-rank0.pt"} & listed:
            missing.append("optimizer.pt")
        if missing:
            raise UserError(f"{path}: incomplete checkpoint (its manifest lists no "
                            f"{', '.join(missing)}); {EARLIER}")
        for name, meta in files.items():
            file = path / name
            if Path(name).is_absolute() or ".." in Path(name).parts or not file.is_file() \
                    or file.stat().st_size != meta["bytes"] or _sha256(file) != meta["sha256"]:
                raise UserError(f"{file}: corrupt or truncated checkpoint file (missing, or "
                                f"size or checksum differs from the manifest); {EARLIER}")
        state = json.loads((path / "state.json").read_text())
        if not all(isinstance(state.get(key), int) for key in STATE_KEYS):
            raise KeyError(f"state.json needs integer {', '.join(STATE_KEYS)}")
        return state
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError,
            OSError) as exc:
        raise UserError(f"{path}: unreadable checkpoint metadata ({type(exc).__name__}: "
                        f"{exc}); {EARLIER}") from exc


def _unreadable(path: Path, exc: Exception) -> UserError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return UserError(f"{path}: cannot restore the checkpoint ({type(exc).__name__}: "
                     f"{first[:200]}); {EARLIER}")


def load_adapter(path: Path, peft_model) -> None:
    """Put the checkpoint's adapter weights into `peft_model` (before `prepare`, so that FSDP
    shards the restored weights). Call `verify` first."""
    from peft import set_peft_model_state_dict
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        set_peft_model_state_dict(
            peft_model, load_file(path / "adapter" / "adapter_model.safetensors"))
    except (SafetensorError, RuntimeError, ValueError, KeyError, OSError) as exc:
        raise _unreadable(path, exc) from exc


def load(path: Path, optimizer, scheduler, accelerator,
         loss_module=None) -> tuple[int, Position]:
    """Restore the rest of a checkpoint written by `save` (after `load_adapter` and
    `prepare`; `loss_module` as prepared, for FSDP to reshard the optimizer state); returns
    (step, data position as saved). The number of processes may differ from the
    checkpoint's (resume.py has checked that it can); a process with no RNG state of its own
    in it takes that of rank `rank % saved processes`.

    Only tensors and plain containers are read: safetensors for the adapter and
    `torch.load(weights_only=True)` for the rest, which refuses arbitrary pickled objects.
    """
    from peftkit.training.distributed import checkpoint_classes, load_optimizer_state

    state = verify(path)
    rank = accelerator.process_index
    optim_file, whole = path / "optimizer.pt", True
    if not optim_file.is_file():  # one partition per process (ZeRO; FSDP of older peftkit)
        optim_file, whole = path / f"optimizer-rank{rank}.pt", False
        if state["world_size"] != accelerator.num_processes:
            raise UserError(f"{path}: its optimizer state is partitioned over "
                            f"{state['world_size']} processes, this run has "
                            f"{accelerator.num_processes}; resume with the same number")
    scaler = getattr(accelerator, "scaler", None)
    try:
        with torch.serialization.safe_globals(checkpoint_classes(accelerator)):
            load_optimizer_state(accelerator, optimizer, _load_plain(optim_file, path),
                                 loss_module if whole else None)
        scheduler.load_state_dict(_load_plain(path / "scheduler.pt", path))
        if scaler is not None and (path / "scaler.pt").is_file():
            scaler.load_state_dict(_load_plain(path / "scaler.pt", path))
        rng_rank = rank if rank < state["world_size"] else rank % state["world_size"]
        set_rng_state(_load_plain(path / f"rng-rank{rng_rank}.pt", path))
    except (pickle.UnpicklingError, RuntimeError, ValueError, KeyError, OSError) as exc:
        raise _unreadable(path, exc) from exc
    return state["step"], Position(state["epoch"], state["index"])


def _load_plain(file: Path, path: Path):
    """`torch.load(weights_only=True)` of one file of checkpoint `path`: tensors and plain
    containers only. A file holding any other pickled object is refused with a UserError that
    names it; torch's own text would advise turning the check off."""
    try:
        with warnings.catch_warnings():
            # torch warns about a pickle protocol other than its own before it refuses the
            # file; the refusal below says all there is to say, on one line.
            warnings.filterwarnings("ignore", message="Detected pickle protocol",
                                    category=UserWarning)
            return torch.load(file, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only load failed" not in str(exc).lower():
            raise
        names = _pickled_globals(file, exc)
        what = f"a pickled object that refers to {', '.join(names)}" if names else \
            "a pickled object"
        raise UserError(f"{file}: holds {what}, not the tensors and plain containers peftkit "
                        "writes; peftkit never unpickles arbitrary objects (that can run any "
                        f"code), so {path.name} cannot be restored: {_instead(path)}") from None


def _pickled_globals(file: Path, exc: Exception) -> list[str]:
    """The Python names (module.name) a refused pickle refers to, found without unpickling
    it: from torch's refusal, else by reading the opcodes of the file's first pickle (a raw
    pickle; torch's zip format has its pickle inside and torch's message names it)."""
    named = re.findall(r"GLOBAL ([\w.]*\w)", str(exc))
    if named:
        return named[:1]
    names, pushed, memo = [], [], {}  # pushed: what each op put on the stack (str or None)
    try:
        with file.open("rb") as f:
            for op, arg, _ in pickletools.genops(f):
                if op.name in ("GLOBAL", "INST"):
                    names.append(arg.replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(pushed) >= 2 \
                        and all(isinstance(s, str) for s in pushed[-2:]):
                    names.append(".".join(pushed[-2:]))
                if op.name in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"):
                    memo[len(memo) if arg is None else arg] = pushed[-1] if pushed else None
                elif op.name in ("GET", "BINGET", "LONG_BINGET"):
                    pushed.append(memo.get(arg))
                elif op.stack_after:
                    pushed.append(arg if isinstance(arg, str) and "GLOBAL" not in op.name
                                  else None)
    except (ValueError, OSError):
        pass
    return list(dict.fromkeys(names))[:3]


def _instead(path: Path) -> str:
    """What to do instead of resuming from checkpoint `path`."""
    earlier = [p for p in step_dirs(path.parent) if step_of(p) < step_of(path)]
    if earlier:
        return f"resume from an earlier checkpoint with --resume {earlier[-1]}, or retrain"
    return "there is no earlier checkpoint; retrain (--overwrite instead of --resume)"
