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
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                console=self.console)
            self.task = self.bar.add_task("train", total=total, completed=start, loss="-",
                                          tps="-")
            self.bar.start()

    def update(self, step: int, loss: float, tokens_per_s: float, lr: float) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(self.task, completed=step, loss=f"{loss:.4f}",
                            tps=f"{tokens_per_s:,.0f}")
        elif step % self.log_every == 0 or step == self.total:
            elapsed = time.monotonic() - self.started
            print(f"step {step}/{self.total}  loss {loss:.4f}  lr {lr:.2e}  "
                  f"{tokens_per_s:,.0f} tok/s  elapsed {elapsed:.0f}s", file=sys.stderr,
                  flush=True)

    def note(self, text: str) -> None:
        if self.enabled:
            self.console.print(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
