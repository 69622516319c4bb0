"""`accelerate launch`, as `peftkit train --nproc N` runs it: the same command, minus the
launcher's own traceback when a worker fails.

A worker that stops on bad input prints its one-line error and exits 2; torch's elastic agent
would then add a ChildFailedError traceback and a failure table. The workers have said what
went wrong (and the main one's exit code reaches `peftkit` through the status file), so that
noise is dropped here. Run as `python -m peftkit.training.accelerate_launch ARGS` = `accelerate launch
ARGS`.
"""

from __future__ import annotations

import logging
import sys


def main() -> int:
    from accelerate.commands.launch import main as accelerate_launch
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    # The agent logs each worker's exit ("failed (exitcode: 2) ...") at error level.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    sys.argv[0] = "accelerate launch"
    try:
        accelerate_launch()
    except ChildFailedError:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
