"""What a person watching a run sees: a live bar in a terminal, plain log lines elsewhere."""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)


class TrainProgress:
    """Step, loss, tokens/s and ETA. Silent on every process but the main one."""

    def __init__(self, total: int, start: int, enabled: bool, log_every: int,
                 console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.enabled, self.total, self.log_every = enabled, total, log_every
        self.live = enabled and self.console.is_terminal
        self.started = time.monotonic()
        self.bar = None
        if self.live:
            self.bar = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
                TextColumn("{task.fields[extra]}"),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                console=self.console)
            self.task = self.bar.add_task("train", total=total, completed=start, loss="-",
                                          tps="-", extra="")
            self.bar.start()

    def update(self, step: int, loss: float, tokens_per_s: float, lr: float,
               extra: dict | None = None) -> None:
        """`extra`: the objective's own figures (preference accuracy, reward margin), when
        it logged them this step."""
        if not self.enabled:
            return
        shown = "".join(f"  {_short(k)} {v:.3f}" for k, v in (extra or {}).items()
                        if k in SHOWN)
        if self.bar is not None:
            self.bar.update(self.task, completed=step, loss=f"{loss:.4f}",
                            tps=f"{tokens_per_s:,.0f}", **({"extra": shown} if extra else {}))
        elif step % self.log_every == 0 or step == self.total:
            elapsed = time.monotonic() - self.started
            print(f"step {step}/{self.total}  loss {loss:.4f}  lr {lr:.2e}  "
                  f"{tokens_per_s:,.0f} tok/s{shown}  elapsed {elapsed:.0f}s", file=sys.stderr,
                  flush=True)

    def note(self, text: str) -> None:
        if self.enabled:
            self.console.print(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


SHOWN = ("preference_accuracy", "reward_margin")


def _short(key: str) -> str:
    return {"preference_accuracy": "acc", "reward_margin": "margin"}.get(key, key)
