"""One side of `peftkit bench`, run in this process: peftkit's own training loop, the plain
Trainer baseline (hf.py) or TRL's SFTTrainer (trl_sft.py). `python -m peftkit.bench.side SPEC.json OUT.json` runs a side in
a fresh process, so that its peak memory is its own (bench.py starts one per side).

Memory is peak RSS (CPU; the kernel's peak counter is reset first) or CUDA max allocated,
above what the process held just before the model loaded (memory.PeakMemory), on both sides.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

from peftkit.bench.same_work import fingerprint, identical_batch
from peftkit.recipe.schema import Recipe, recipe_from_dict
from peftkit.run.quiet import quiet_libraries
from peftkit.run.rundir import RunDir

SIDES = ("peftkit", "hf", "hf-grouped", "trl")


def _peftkit(recipe: Recipe, source: str) -> dict:
    from rich.console import Console

    from peftkit.data import dataset
    from peftkit.data import packing
    from peftkit.run import rundir
    from peftkit.data.batching import collate
    from peftkit.training.loss import TokenLoss
    from peftkit.model.loading import base_path, load_tokenizer
    from peftkit.training.loop import train

    result = train(recipe, source, overwrite=True, console=Console(stderr=True))
    steps = [m for m in rundir.read_metrics(result.path)
             if "event" not in m and "loss" in m and "tokens" in m]
    state = json.loads((RunDir(result.path).checkpoint(result.steps) /
                        "state.json").read_text())
    model = result.model
    base = model.get_base_model()
    packed = recipe.data.packing and base.config._attn_implementation in packing.PACKED_KERNELS

    # Which samples were trained: all of them, once, if the data holds exactly the samples of
    # the run and the stream stopped at the end of epoch 0 (bench.select_samples wrote them).
    tokenizer, _ = load_tokenizer(base_path(recipe.model), recipe.model)
    examples, _, _, _ = dataset.build(recipe.data, tokenizer, recipe.train.seed)
    windows = len(steps) * recipe.train.grad_accum
    one_pass = (len(examples) == windows * recipe.train.batch_size
                and (state["epoch"], state["index"]) == (0, windows))
    used = examples if one_pass else []
    # The objective on an identical batch (the first samples, data order), through peftkit's
    # own collation and loss.
    first = examples[:recipe.train.batch_size]
    batch = packing.to_device((packing.collate_packed if packed else collate)(
        first, tokenizer.pad_token_id), model.device)

    def loss():
        loss_sum, count = TokenLoss(model)(**batch)
        return loss_sum / count

    return {
        "step_seconds": result.step_seconds,
        "step_loss": [m["loss"] for m in steps],
        "step_tokens": [m["tokens"] for m in steps],
        "computed_tokens": _computed_tokens(examples, recipe, packed, len(steps)),
        "samples": sorted(fingerprint(e.input_ids) for e in used),
        "stream_position": [state["epoch"], state["index"]],
        **identical_batch(model, loss),
        "parameters": [result.trainable, result.total],
        "memory": result.memory.get("measured", {}),
        "packed": packed,
    }


def _computed_tokens(examples, recipe: Recipe, packed: bool, steps: int) -> int:
    """Tokens the model ran on, padding included (replays the data order of the run)."""
    from peftkit.data.batching import BatchStream

    stream = BatchStream(examples, recipe.train.batch_size, recipe.train.seed)
    batches = [stream.next() for _ in range(steps * recipe.train.grad_accum)]
    if packed:
        return sum(len(e.input_ids) for b in batches for e in b)
    return sum(len(b) * max(len(e.input_ids) for e in b) for b in batches)


def run_side(side: str, recipe: Recipe, source: str = "") -> dict:
    """Train one side and return its measurements (JSON-serialisable)."""
    if side not in SIDES:
        raise ValueError(f"unknown side {side!r}")
    load_before = os.getloadavg()
    began = time.perf_counter()
    if side == "peftkit":
        out = _peftkit(recipe, source)
    elif side == "trl":
        from peftkit.bench import trl_sft

        out = trl_sft.run(recipe)
    else:
        from peftkit.bench import hf as bench_hf

        out = bench_hf.run(recipe, grouped=side == "hf-grouped")
    out.update(side=side, threads=torch.get_num_threads(), wall_seconds=time.perf_counter()
               - began, loadavg_before=load_before, loadavg_after=os.getloadavg())
    return out


def main(argv: list[str]) -> int:
    spec_path, out_path = argv
    spec = json.loads(open(spec_path).read())
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    quiet_libraries()
    out = run_side(spec["side"], recipe_from_dict(spec["recipe"]), spec.get("source", ""))
    with open(out_path, "w") as f:
        json.dump(out, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
