"""The run directory: what a run leaves on disk (see README, "Run directory")."""

from __future__ import annotations

import json
import platform
import shutil
import time
from importlib import metadata
from pathlib import Path

from peftkit.recipe.schema import Recipe
from peftkit.errors import UserError

LIBRARIES = ("peftkit", "torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets")


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
    if not (path / "recipe.json").is_file() and not (path / "checkpoints").is_dir():
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
    doc = {"name": recipe.name, "source": source, "base_path": base,
           "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "versions": versions(),
           "recipe": recipe.to_dict()}
    write_json(path / "recipe.json", doc)


def record_resume(path: Path, recipe: Recipe, step: int) -> None:
    """On --resume, recipe.json takes the recipe the run now continues with (only settings in
    config.RESUME_SAFE can differ) and lists when and from which step it resumed."""
    try:
        doc = json.loads((path / "recipe.json").read_text())
    except (OSError, ValueError):
        doc = {"name": recipe.name}
    doc["recipe"] = recipe.to_dict()
    doc.setdefault("resumed", []).append(
        {"at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "from_step": step, "versions": versions()})
    write_json(path / "recipe.json", doc)


def write_json(path: Path, obj) -> None:
    """Write via a temporary file and rename, so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    tmp.replace(path)


def read_metrics(path: Path) -> list[dict]:
    file = path / "metrics.jsonl"
    if not file.is_file():
        return []
    return [json.loads(line) for line in file.read_text().splitlines() if line.strip()]


class MetricsLog:
    """Appends one JSON object per logged step/eval to metrics.jsonl (main process only)."""

    def __init__(self, path: Path, enabled: bool):
        self.file = path / "metrics.jsonl"
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
