"""Stop a training run cleanly on SIGINT (Ctrl-C) or SIGTERM (a scheduler taking the machine).

While the step loop runs, a first signal only raises a flag. The loop polls it once per
optimizer step (`StopRequest.requested`), finishes that step, writes a checkpoint and raises
`Interrupted`; the CLI prints one line with the command that resumes the run and exits with
the shell's code for the signal, 128 + N: 130 for SIGINT, 143 for SIGTERM. A second signal
acts at once, as if peftkit had not intercepted the first (KeyboardInterrupt for SIGINT,
termination for SIGTERM). Before and after the loop the previous handlers are in place. A
signal ignored when the loop starts stays ignored, as Python leaves it: a shell starts
background jobs with SIGINT ignored so that a Ctrl-C meant for the foreground spares them.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterable, Iterator

from peftkit.errors import RunError

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(RunError):
    """The run stopped on a signal after writing a complete checkpoint."""

    resumable = True

    def __init__(self, signum: int, step: int, checkpoint):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; "
                         f"checkpoint {checkpoint} is complete")


class StopRequest:
    """The signal that asked the run to stop, if any, while `steps()` is being iterated."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def steps(self, numbers: Iterable[int]) -> Iterator[int]:
        """Yield `numbers` with the handlers installed; the previous handlers come back when
        the loop ends, however it ends (the generator is closed with the loop's frame)."""
        self._install()
        try:
            yield from numbers
        finally:
            self._restore()

    def requested(self, accelerator) -> int | None:
        """The signal to stop on after this step, or None. With several processes a signal
        seen by any of them stops all of them after the same step (a collective: every
        process must call this once per step)."""
        if accelerator.num_processes == 1:
            return self.signum
        import torch

        seen = torch.tensor([float(self.signum == s) for s in SIGNALS], device=accelerator.device)
        seen = accelerator.reduce(seen, reduction="sum").tolist()
        # SIGTERM first: a scheduler is taking the machine away, whatever else happened.
        return next((s for s, n in reversed(list(zip(SIGNALS, seen))) if n), None)

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread may set handlers (e.g. a notebook's worker thread)
        for sig in SIGNALS:
            if signal.getsignal(sig) is signal.SIG_IGN:
                continue  # ignored on purpose by whoever started us (`cmd &` in a script)
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            # getsignal() gives None for a handler not set from Python: the default then.
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        # No printing here: a handler that writes to a stream the main thread is writing
        # to can fail with "reentrant call". The loop reports the stop.
        if self.signum is None:
            self.signum = signum
            return
        self._restore()  # second signal: hand it to the previous handler, now
        signal.raise_signal(signum)
