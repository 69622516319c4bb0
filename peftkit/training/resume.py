"""Resuming: find the checkpoint `--resume [PATH]` means, and refuse one from another recipe.

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
                 run_dir: Path) -> list[str]:
    """Refuse (UserError) a checkpoint from another recipe or world size; return notes on
    the allowed changes (this run writes to `run_dir`)."""
    if state["world_size"] != world_size:
        raise UserError(f"--resume {path}: written by {state['world_size']} processes, this "
                        f"run has {world_size}; resume with --nproc {state['world_size']}")
    saved = state.get("recipe")
    if not isinstance(saved, dict):
        return [f"{path} records no recipe (written by an older peftkit); the settings "
                "could not be compared"]
    refused, allowed = differences(saved, recipe)
    if refused:
        raise UserError(f"--resume {path}: the checkpoint was trained with a different recipe "
                        f"({'; '.join(refused)}); undo these changes, {NEW_RUN}. Settings "
                        f"that may change on resume: {', '.join(sorted(RESUME_SAFE))}")
    notes = [f"resuming with changed settings (allowed): {'; '.join(allowed)}"] if allowed \
        else []
    if any(item.startswith(("train.max_steps", "train.epochs")) for item in allowed):
        notes.append("the learning-rate schedule follows the new number of steps from here on")
    later = [p.name for p in checkpoint.step_dirs(RunDir(run_dir).checkpoints)
             if checkpoint.step_of(p) > state["step"]]
    if later and path.parent.resolve() == RunDir(run_dir).checkpoints.resolve():
        notes.append(f"{', '.join(later)} come after {path.name}: this run replaces them "
                     "with its own as it saves")
    return notes


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
