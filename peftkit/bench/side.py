"""One side of `peftkit bench`, run in this process: peftkit's own training loop, the plain
Trainer baseline (hf.py) or TRL (trl_sft.py: SFTTrainer; trl_dpo.py: DPOTrainer).
`python -m peftkit.bench.side SPEC.json OUT.json` runs a side in
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
from peftkit.recipe.objective import PREFERENCE_OBJECTIVES
from peftkit.recipe.schema import Recipe, recipe_from_dict
from peftkit.run.quiet import quiet_libraries
from peftkit.run.rundir import RunDir

SIDES = ("peftkit", "hf", "hf-grouped", "trl")


def _peftkit(recipe: Recipe, source: str) -> dict:
    from rich.console import Console

    from peftkit.data import packing
    from peftkit.run import rundir
    from peftkit.data.batching import collate
    from peftkit.training.loss import TokenLoss
    from peftkit.model.loading import base_path, load_tokenizer
    from peftkit.training.loop import train
    from peftkit.training.objectives import objective_for

    result = train(recipe, source, overwrite=True, console=Console(stderr=True))
    steps = [m for m in rundir.read_metrics(result.path)
             if "event" not in m and "loss" in m and "tokens" in m]
    state = json.loads((RunDir(result.path).checkpoint(result.steps) /
                        "state.json").read_text())
    model = result.model
    base = model.get_base_model()
    objective = objective_for(recipe)
    packed = (recipe.data.packing and objective.packable
              and base.config._attn_implementation in packing.PACKED_KERNELS)

    # Which samples were trained: all of them, once, if the data holds exactly the samples of
    # the run and the stream stopped at the end of epoch 0 (bench.select_samples wrote them).
    tokenizer, _ = load_tokenizer(base_path(recipe.model), recipe.model)
    examples, _, _, _ = objective.build_data(tokenizer)  # SFT examples or preference pairs
    windows = len(steps) * recipe.train.grad_accum
    one_pass = (len(examples) == windows * recipe.train.batch_size
                and (state["epoch"], state["index"]) == (0, windows))
    used = examples if one_pass else []
    # The objective on an identical batch (the first samples, data order), through peftkit's
    # own collation and loss.
    first = examples[:recipe.train.batch_size]
    preference = {}
    if recipe.train.objective in PREFERENCE_OBJECTIVES:
        loss, preference = _preference_probe(recipe, model, examples, tokenizer.pad_token_id)
    else:
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
        **preference,
    }


def _preference_probe(recipe: Recipe, model, pairs: list, pad_id: int):
    """peftkit's DPO loss on the identical batch (the first pairs, data order), and its
    reference pass timed on its own: `fill_reference`, the function that runs before step 1,
    over every pair of the run (adapter disabled, batches of train.batch_size)."""
    from accelerate import Accelerator

    from peftkit.data import packing
    from peftkit.training import preference

    t = recipe.train
    began = time.perf_counter()
    if t.objective == "dpo":
        preference.fill_reference(Accelerator(), model, pairs, t.batch_size, pad_id,
                                  adapter_is_reference=False)
    seconds = time.perf_counter() - began
    first = pairs[:t.batch_size]
    batch = packing.to_device(preference.collate_pairs(first, pad_id), model.device)
    module = preference.PreferenceLoss(model, t.objective, t.beta, t.dpo_loss,
                                       t.label_smoothing, t.orpo_lambda)

    def loss():
        loss_sum, count = module(**batch)
        return loss_sum / count

    return loss, {"reference_seconds": seconds if t.objective == "dpo" else None,
                  "reference_logps": [x for p in first for x in (p.ref_chosen, p.ref_rejected)]}


def _computed_tokens(examples, recipe: Recipe, packed: bool, steps: int) -> int:
    """Tokens the model ran on, padding included (replays the data order of the run)."""
    from peftkit.bench.same_work import sequences
    from peftkit.data.batching import BatchStream

    stream = BatchStream(examples, recipe.train.batch_size, recipe.train.seed)
    batches = [stream.next() for _ in range(steps * recipe.train.grad_accum)]
    if packed:
        return sum(len(e.input_ids) for b in batches for e in b)
    # Padded batches; a batch of pairs is its chosen and rejected sequences, padded together.
    rows = [[s for e in b for s in sequences(e)] for b in batches]
    return sum(len(r) * max(len(s.input_ids) for s in r) for r in rows)


def run_side(side: str, recipe: Recipe, source: str = "") -> dict:
    """Train one side and return its measurements (JSON-serialisable)."""
    if side not in SIDES:
        raise ValueError(f"unknown side {side!r}")
    load_before = os.getloadavg()
    began = time.perf_counter()
    if side == "peftkit":
        out = _peftkit(recipe, source)
    elif side == "trl" and recipe.train.objective in PREFERENCE_OBJECTIVES:
        from peftkit.bench import trl_dpo

        out = trl_dpo.run(recipe)
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
