"""Experiment trackers (train.report_to): the numbers of metrics.jsonl, also sent to
TensorBoard, Weights & Biases or MLflow through accelerate's tracker API.

Offline-safe by default: TensorBoard writes event files under runs/<name>/tb/, MLflow writes
to its local ./mlruns store unless MLFLOW_TRACKING_URI says otherwise, and W&B runs in offline
mode (files under runs/<name>/wandb/, `wandb sync` later) unless WANDB_MODE or WANDB_API_KEY
is set.
"""

from __future__ import annotations

import os

from peftkit.run import rundir
from peftkit.recipe.schema import Recipe
from peftkit.errors import UserError
from peftkit.run.rundir import RunDir

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def available(name: str) -> bool:
    from accelerate.utils import is_mlflow_available, is_tensorboard_available, is_wandb_available

    return {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available,
            "mlflow": is_mlflow_available}[name]()


def accelerator_args(recipe: Recipe) -> dict:
    """Keyword arguments of `Accelerator(...)` for the recipe's tracker ({} for none).
    Fails before anything loads if the tracker's package is not installed."""
    from accelerate.utils import ProjectConfiguration

    name = recipe.train.report_to
    if name == "none":
        return {}
    if not available(name):
        raise UserError(f"train.report_to={name}: {PACKAGES[name]} is not installed; "
                        f"pip install {PACKAGES[name]}, or train.report_to=none")
    path = rundir.run_dir(recipe)
    return {"log_with": name,
            "project_config": ProjectConfiguration(project_dir=str(path),
                                                   logging_dir=str(RunDir(path).tensorboard))}


def _flat(prefix: str, obj: dict) -> dict:
    """{"train": {"lr": 1e-4}} -> {"train.lr": 1e-4}; None -> "none" (hparams want scalars)."""
    out = {}
    for key, value in obj.items():
        if isinstance(value, dict):
            out.update(_flat(f"{prefix}{key}.", value))
        else:
            out[f"{prefix}{key}"] = "none" if value is None else value
    return out


def start(accelerator, recipe: Recipe, log: rundir.MetricsLog):
    """Start the recipe's tracker (main process only) and return a log that writes each
    metrics.jsonl record to it too; `log` itself when no tracker is chosen."""
    name = recipe.train.report_to
    if name == "none":
        return log
    path = rundir.run_dir(recipe)
    if name == "wandb" and not (os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY")):
        os.environ["WANDB_MODE"] = "offline"  # never block on a login prompt or the network
    kwargs = {"wandb": {"name": recipe.name, "dir": str(path)},
              "mlflow": {"run_name": recipe.name}}
    accelerator.init_trackers(recipe.name, config=_flat("", recipe.to_dict()),
                              init_kwargs={name: kwargs[name]} if name in kwargs else {})
    return TrackedLog(log, accelerator)


class TrackedLog:
    """metrics.jsonl plus `accelerator.log` of the same record's numbers, keyed by event:
    train/loss, eval/eval_loss, data/rows, ..."""

    def __init__(self, log: rundir.MetricsLog, accelerator):
        self.log, self.accelerator = log, accelerator

    def write(self, **record) -> None:
        self.log.write(**record)
        group = record.get("event", "train")
        values = {f"{group}/{k}": v for k, v in record.items()
                  if k not in ("step", "event") and isinstance(v, (int, float))
                  and not isinstance(v, bool)}
        if values:
            self.accelerator.log(values, step=record.get("step"))

    def __getattr__(self, name):  # truncate_after, file, enabled: those of metrics.jsonl
        return getattr(self.log, name)
