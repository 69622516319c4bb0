"""Resuming: find the checkpoint `--resume [PATH]` means, refuse one from another recipe, and
carry it over to another number of processes (same global batch, same rows in the same order).

A checkpoint's state.json holds the resolved recipe it was trained with and a fingerprint of
the tokenized training data. Resuming compares them with the run being started, field by
field over the recipe schema: a difference in any setting that shapes the trajectory (model,
adapter, data, seed, batch geometry, optimizer, schedule...) is refused, naming every one;
settings in `config.RESUME_SAFE` (more steps, log/eval/save frequency, output_dir...) may
change, and each change is reported as a note.
"""

from __future__ import annotations

import dataclasses
import hashlib
from array import array
from pathlib import Path

from peftkit.data.batching import Position
from peftkit.training import checkpoint
from peftkit.recipe.schema import RESUME_SAFE, SECTIONS, Recipe
from peftkit.errors import UserError
from peftkit.run.rundir import RunDir

NEW_RUN = "or start a new run (name=NEW, or --overwrite to replace this one)"


def find(run_dir: Path, resume: bool | str, overwrite: bool = False) -> Path:
    """The checkpoint to resume: PATH (a checkpoint, or a run directory: its newest
    complete one), or the newest complete checkpoint of `run_dir`."""
    if overwrite:
        raise UserError("--resume and --overwrite contradict each other: --resume continues "
                        "the run, --overwrite deletes it and starts again; pass one")
    if isinstance(resume, str):
        path = Path(resume)
        if not path.is_dir():
            raise UserError(f"--resume {resume}: no such checkpoint directory; pass a "
                            f"checkpoints/step-N directory, or --resume alone for the newest")
        if (path / checkpoint.MANIFEST).is_file() or not RunDir(path).checkpoints.is_dir():
            return path  # verify() explains what is wrong with a directory that is neither
        run_dir = path
    found = checkpoint.step_dirs(RunDir(run_dir).checkpoints)
    if not found:
        fix = "start it over with --overwrite" if RunDir(run_dir).recipe_file.is_file() else \
            "train without --resume first"
        raise UserError(f"--resume: no complete checkpoint under {run_dir / 'checkpoints'}; "
                        f"{fix}")
    return found[-1]


def continues(run_dir: Path, path: Path) -> bool:
    """Whether resuming from checkpoint `path` continues the run in `run_dir` (True) or
    starts a new run directory from another run's checkpoint (False; `run_dir` must then
    hold no run)."""
    if path.parent.resolve() == RunDir(run_dir).checkpoints.resolve():
        return True
    if run_dir.is_dir() and any(run_dir.iterdir()):
        raise UserError(f"--resume {path}: that checkpoint belongs to another run directory, "
                        f"and {run_dir} already holds a run; continue in a new one with "
                        "name=NEW (or train.output_dir=DIR)")
    return False


def differences(saved: dict, recipe: Recipe) -> tuple[list[str], list[str]]:
    """(refused, allowed): "key: old -> new" for each setting where `recipe` differs from
    the `saved` recipe dict. A setting the saved recipe lacks (added to peftkit since)
    counts as having had its default."""
    now = recipe.to_dict()
    refused, allowed = [], []
    pairs = [("name", saved.get("name", ""), recipe.name)]
    for section, cls in SECTIONS.items():
        old_section = saved.get(section) or {}
        for f in dataclasses.fields(cls):
            pairs.append((f"{section}.{f.name}", old_section.get(f.name, f.default),
                          now[section][f.name]))
    for key, old, new in pairs:
        if old != new:
            (allowed if key in RESUME_SAFE else refused).append(f"{key}: {old!r} -> {new!r}")
    return refused, allowed


def check_recipe(path: Path, state: dict, recipe: Recipe, world_size: int,
                 run_dir: Path) -> tuple[Recipe, list[str]]:
    """Refuse (UserError) a checkpoint from another recipe or global batch; return the recipe
    to resume with (train.grad_accum adapted to a changed number of processes, see `rebatch`)
    and notes on the allowed changes (this run writes to `run_dir`)."""
    recipe, notes = rebatch(path, state, recipe, world_size)
    saved = state.get("recipe")
    if not isinstance(saved, dict):
        return recipe, notes + [f"{path} records no recipe (written by an older peftkit); the "
                                "settings could not be compared"]
    refused, allowed = differences(saved, recipe)
    accum = [item for item in refused if item.startswith("train.grad_accum:")]
    batch_changed = any(item.startswith("train.batch_size:") for item in refused)
    if accum and not batch_changed:  # allowed if it keeps the global batch: the same rows
        change = _global_batch(state, world_size, recipe)
        refused.remove(accum[0])
        if change:
            refused.append(f"{accum[0]} (the global batch {change})")
        elif not notes:  # (rebatch's note already says why it changed)
            allowed.append(f"{accum[0]} (the global batch stays the same)")
    if refused:
        raise UserError(f"--resume {path}: the checkpoint was trained with a different recipe "
                        f"({'; '.join(refused)}); undo these changes, {NEW_RUN}. Settings "
                        f"that may change on resume: {', '.join(sorted(RESUME_SAFE))}")
    if allowed:
        notes.append(f"resuming with changed settings (allowed): {'; '.join(allowed)}")
    if any(item.startswith(("train.max_steps", "train.epochs")) for item in allowed):
        notes.append("the learning-rate schedule follows the new number of steps from here on")
    later = [p.name for p in checkpoint.step_dirs(RunDir(run_dir).checkpoints)
             if checkpoint.step_of(p) > state["step"]]
    if later and path.parent.resolve() == RunDir(run_dir).checkpoints.resolve():
        notes.append(f"{', '.join(later)} come after {path.name}: this run replaces them "
                     "with its own as it saves")
    return recipe, notes


def _geometry(state: dict, recipe: Recipe) -> tuple[int, int, int]:
    """(batch_size, grad_accum, processes) the checkpoint was trained with."""
    saved = (state.get("recipe") or {}).get("train") or {}
    return (saved.get("batch_size", recipe.train.batch_size),
            saved.get("grad_accum", recipe.train.grad_accum), state["world_size"])


def _global_batch(state: dict, world: int, recipe: Recipe) -> str | None:
    """None if `recipe` on `world` processes keeps the checkpoint's global batch, else what
    it was and would be ("2 x 2 x 2 = 8 rows, now 2 x 2 x 1 = 4")."""
    batch, accum, old_world = _geometry(state, recipe)
    t = recipe.train
    if batch * accum * old_world == t.batch_size * t.grad_accum * world:
        return None
    return (f"batch_size x grad_accum x processes = {batch} x {accum} x {old_world} = "
            f"{batch * accum * old_world} rows, now {t.batch_size} x {t.grad_accum} x {world} "
            f"= {t.batch_size * t.grad_accum * world}")


def rebatch(path: Path, state: dict, recipe: Recipe, world: int) -> tuple[Recipe, list[str]]:
    """Resume on another number of processes: keep the global batch (the rows of one
    optimizer step) by scaling train.grad_accum, so the run continues on the same rows in
    the same order. (Refusing would make the user do this sum; changing train.batch_size
    instead would change each process's memory use.) Refused when it cannot be kept, and
    when the optimizer state is partitioned per process (DeepSpeed ZeRO)."""
    batch, accum, old_world = _geometry(state, recipe)
    if world == old_world:
        return recipe, []
    if not (path / "optimizer.pt").is_file():
        raise UserError(f"--resume {path}: its optimizer state is partitioned over "
                        f"{old_world} processes (DeepSpeed ZeRO), this run has {world}; "
                        f"resume with {old_world} processes (--nproc)")
    t = recipe.train
    if (t.batch_size, t.grad_accum) != (batch, accum):
        return recipe, []  # the user chose another geometry: check_recipe judges it
    if accum * old_world % world:
        raise UserError(f"--resume {path}: written by {old_world} processes with "
                        f"train.grad_accum={accum}; its global batch ({batch} x {accum} x "
                        f"{old_world} = {batch * accum * old_world} rows) cannot be split "
                        f"over {world} processes of train.batch_size={batch}; resume with a "
                        f"number of processes that divides {accum * old_world}")
    adapted = dataclasses.replace(recipe, train=dataclasses.replace(
        t, grad_accum=accum * old_world // world))
    return adapted, [f"resuming on {world} processes a run checkpointed on {old_world}: "
                     f"train.grad_accum {accum} -> {adapted.train.grad_accum} keeps the global "
                     f"batch at {batch * accum * old_world} rows (the same rows, in the same "
                     "order)"]


def position(path: Path, state: dict, recipe: Recipe, world: int) -> Position:
    """The checkpoint's data position counted in this run's micro-batches (batch_size x
    processes rows; BatchStream), which differ from the checkpoint's when the number of
    processes changed."""
    batch, _, old_world = _geometry(state, recipe)
    rows, unit = state["index"] * batch * old_world, recipe.train.batch_size * world
    if rows % unit:
        raise UserError(f"--resume {path}: its data position ({rows} rows into epoch "
                        f"{state['epoch']}) falls inside a micro-batch of {world} processes "
                        f"({unit} rows); resume with {old_world} processes, or from another "
                        "checkpoint")
    return Position(state["epoch"], rows // unit)


def fingerprint(examples) -> str:
    """A hash of the tokenized training examples (token ids and labels, in order)."""
    digest = hashlib.sha256()
    for example in examples:
        ids, labels = array("q", example.input_ids), array("q", example.labels)
        digest.update(len(ids).to_bytes(8, "little") + ids.tobytes() + labels.tobytes())
    return digest.hexdigest()


def check_data(path: Path, state: dict, current: str) -> None:
    """Refuse to resume on training data that differ from the checkpoint's."""
    saved = state.get("data_fingerprint")
    if saved is not None and saved != current:
        raise UserError(f"--resume {path}: the training data differ from the checkpoint's "
                        "(the file's rows or the tokenizer changed), so the data order cannot "
                        f"continue where it stopped; restore the data, {NEW_RUN}")
