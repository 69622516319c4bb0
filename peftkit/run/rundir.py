"""The run directory: what a run leaves on disk (see README, "Run directory")."""

from __future__ import annotations

import json
import platform
import shutil
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from peftkit.recipe.schema import Recipe
from peftkit.errors import UserError

LIBRARIES = ("peftkit", "torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets")


@dataclass(frozen=True)
class RunDir:
    """The layout of a run directory (docs: README, "Run directory"): every path in one is
    named here, so writers and readers cannot disagree. Inside a checkpoint, the files are
    training/checkpoint.py's to name."""

    path: Path

    @property
    def recipe_file(self) -> Path:
        return self.path / "recipe.json"

    @property
    def adapter(self) -> Path:
        return self.path / "adapter"

    @property
    def adapter_config(self) -> Path:
        return self.adapter / "adapter_config.json"

    @property
    def tokenizer(self) -> Path:
        return self.path / "tokenizer"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step-{step}"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def loss_plot(self) -> Path:
        return self.path / "loss.png"

    @property
    def card(self) -> Path:
        return self.path / "README.md"

    @property
    def result_file(self) -> Path:
        return self.path / "result.json"

    @property
    def eval_file(self) -> Path:
        return self.path / "eval.json"

    @property
    def push_folder(self) -> Path:
        return self.path / "push"

    @property
    def tensorboard(self) -> Path:
        return self.path / "tb"


@dataclass(frozen=True)
class MergeDir:
    """The layout of a `peftkit merge` output beside the model files it holds."""

    path: Path

    @property
    def report_file(self) -> Path:
        return self.path / "merge_report.json"

    @property
    def failed_marker(self) -> Path:
        return self.path / "MERGE_FAILED.txt"


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for lib in LIBRARIES:
        try:
            found[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            pass
    return found


def run_dir(recipe: Recipe) -> Path:
    return Path(recipe.train.output_dir) / recipe.name


def check_target(path: Path, overwrite: bool) -> None:
    """Refuse (before any weights load) to train into a directory that already holds a run.

    The user says --resume (continue it) or --overwrite (replace it); a non-empty directory
    that is not a peftkit run is never deleted.
    """
    if not (path.is_dir() and any(path.iterdir())):
        return
    if not overwrite:
        raise UserError(f"{path} already holds a run; pass --resume to continue it, "
                        "--overwrite to replace it, or name=NEW for a new run directory")
    if not RunDir(path).recipe_file.is_file() and not RunDir(path).checkpoints.is_dir():
        raise UserError(f"--overwrite: {path} is not empty and is not a peftkit run; "
                        "refusing to delete it")


def prepare(path: Path, overwrite: bool, resume: bool) -> None:
    """Create (or, with --overwrite, empty) the run directory; main process only."""
    if resume:
        return
    if overwrite and path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)


def write_recipe(path: Path, recipe: Recipe, source: str, base: str) -> None:
    from peftkit.model.sources import record

    doc = {"name": recipe.name, "source": source, "base_path": base,
           "weights": record(recipe.model, base),
           "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "versions": versions(),
           "recipe": recipe.to_dict()}
    write_json(RunDir(path).recipe_file, doc)


def record_resume(path: Path, recipe: Recipe, step: int) -> None:
    """On --resume, recipe.json takes the recipe the run now continues with (only settings in
    config.RESUME_SAFE can differ) and lists when and from which step it resumed."""
    try:
        doc = json.loads(RunDir(path).recipe_file.read_text())
    except (OSError, ValueError):
        doc = {"name": recipe.name}
    doc["recipe"] = recipe.to_dict()
    doc.setdefault("resumed", []).append(
        {"at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "from_step": step, "versions": versions()})
    write_json(RunDir(path).recipe_file, doc)


def write_json(path: Path, obj) -> None:
    """Write via a temporary file and rename, so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    tmp.replace(path)


def read_metrics(path: Path) -> list[dict]:
    file = RunDir(path).metrics_file
    if not file.is_file():
        return []
    return [json.loads(line) for line in file.read_text().splitlines() if line.strip()]


class MetricsLog:
    """Appends one JSON object per logged step/eval to metrics.jsonl (main process only)."""

    def __init__(self, path: Path, enabled: bool):
        self.file = RunDir(path).metrics_file
        self.enabled = enabled

    def write(self, **record) -> None:
        if self.enabled:
            with self.file.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def truncate_after(self, step: int) -> None:
        """On resume, drop records of steps that will be trained again."""
        if self.enabled and self.file.is_file():
            kept = [r for r in read_metrics(self.file.parent) if r.get("step", 0) <= step]
            self.file.write_text("".join(json.dumps(r) + "\n" for r in kept))
