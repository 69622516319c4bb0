"""Silence library chatter that is not actionable for peftkit users.

Called once at the start of every peftkit process that trains, evaluates or benchmarks: the
`peftkit` command line (cli/app.py) and each benchmark side's fresh process (bench/side.py).
"""

from __future__ import annotations

import logging
import warnings


def quiet_libraries() -> None:
    """Silence library chatter that is not actionable for peftkit users."""
    # bitsandbytes logs a warning on import on CPUs with AVX512-BF16 when the optional
    # `kernels` package is absent; its slower built-in path is used instead.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # bitsandbytes' 8-bit layers log "inputs will be cast ... to float16" on every eval-mode
    # forward with float32 inputs (CPU): expected, and thousands of lines per evaluation.
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    # peft calls a transformers method deprecated in v5 (is_gradient_checkpointing).
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    # datasets logs an unreadable parquet file as an ERROR before raising; peftkit reports
    # the raised error itself, on one line (peftkit.data), so the log line is a duplicate.
    logging.getLogger("datasets.packaged_modules.parquet.parquet").setLevel(logging.CRITICAL)
    # Prompt tuning: generate passes position ids, which peft ignores (correctly: the
    # virtual tokens shift every position).
    warnings.filterwarnings("ignore", message="Position ids are not supported for parameter")
    # PiSSA/OLoRA checkpoints keep the unconverted adapter on purpose (resume needs it); the
    # final adapter is converted to a plain LoRA (adapters' save_adapter), as peft advises.
    warnings.filterwarnings("ignore", message="(PiSSA|OLoRA) changes the base weights")
    # peft asks the Hub for the base's config.json to spot a resized vocabulary; peftkit never
    # resizes it, and offline (a Hub id served by a converted GGUF) the question just fails.
    warnings.filterwarnings("ignore", message="Could not find a config file in")
