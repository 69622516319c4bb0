"""The merge probe: a fixed, small batch of held-out examples on which training records the
trained model's loss (result.json "probe") and `peftkit merge` checks the merged model
(peftkit/export/merge.py), so that a merge is compared with the model training produced and
not only with the files on disk.
"""

from __future__ import annotations

import hashlib
import json

import torch

from peftkit.data.batching import IGNORE
from peftkit.data.example import Example
from peftkit.training.evaluation import eval_loss

# The probe batch: the first PROBE_EXAMPLES held-out examples with a labelled token in their
# first PROBE_TOKENS tokens, cut there. Small on purpose: two [tokens x vocab] float32 logit
# tensors are kept (~260 MB each for a 128k vocabulary).
PROBE_EXAMPLES, PROBE_TOKENS = 4, 128


def probe_examples(examples: list[Example]) -> list[Example]:
    picked = []
    for e in examples:
        ids, labels = e.input_ids[:PROBE_TOKENS], e.labels[:PROBE_TOKENS]
        if any(label != IGNORE for label in labels[1:]):
            picked.append(Example(ids, labels))
        if len(picked) == PROBE_EXAMPLES:
            break
    return picked


def fingerprint(examples: list[Example]) -> str:
    text = json.dumps([[e.input_ids, e.labels] for e in examples])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def record_probe(accelerator, loss_module, eval_examples, pad_id: int, precision,
                 quantize: str | None) -> dict:
    """The trained model's loss on the probe batch (result.json "probe"), so that a merge is
    checked against the model training produced and not only against the files on disk."""
    probe = probe_examples(eval_examples)
    if len(probe) < accelerator.num_processes:  # every process must run the same forwards
        return {}
    loss = eval_loss(accelerator, loss_module, probe, len(probe), pad_id)
    compute = precision.compute_dtype
    return {"loss": loss, "examples": len(probe), "fingerprint": fingerprint(probe),
            "dtype": dtype_name(precision.dtype),
            "compute_dtype": compute and dtype_name(compute),
            "mixed_precision": str(accelerator.mixed_precision), "quantize": quantize}


def dtype_name(dtype: torch.dtype) -> str:
    """"float32", not "torch.float32": how the probe record (and merge_report.json) name it."""
    return str(dtype).removeprefix("torch.")
