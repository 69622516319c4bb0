"""The training run's setup phases, in the order `train()` (loop.py) calls them: the
accelerator, run directory and resume point (`setup_run`: every cheap check, before any
weights load), the data (`setup_data`), the model with its adapter (`setup_model`), the
optimizer and schedule with any resumed state (`setup_optimizer`). Each returns a small
dataclass; together they are the `TrainingState` the steps and the finish read. Nothing here
writes to the run directory: a run that fails to start leaves none behind.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from peftkit.adapters.registry import adapter_method
from peftkit.data import dataset, packing
from peftkit.data.batching import BatchStream, Position
from peftkit.data.example import Example, Prompt
from peftkit.errors import UserError
from peftkit.model import allocator, compiled, fused_lora, memory, quantize
from peftkit.model.sharded import give_trainable_storage
from peftkit.model.loading import (Precision, attach_adapter, base_path, count_parameters,
                                   load_model, load_tokenizer, prepare_for_training,
                                   resolve_precision)
from peftkit.recipe.schema import Recipe
from peftkit.run import hub, rundir, tracking
from peftkit.training import adapter_init, checkpoint, distributed
from peftkit.training import resume as resuming
from peftkit.training.objectives import NextTokenObjective, objective_for

if TYPE_CHECKING:
    from accelerate import Accelerator


# --- the state the setup phases build ------------------------------------------------------

@dataclass
class RunSetup:
    """Where and how this process trains: accelerate's view, the run directory, the resume
    point. Built before anything is loaded or written."""
    accelerator: Accelerator
    recipe: Recipe              # as given; resuming on another number of processes, with
                                # train.grad_accum adapted to keep the global batch
    precision: Precision
    path: Path                  # the run directory (not created yet)
    resume_from: Path | None    # the checkpoint to continue from
    saved: dict | None          # its state.json, checked against its manifest
    position: Position | None   # its data position, in this run's micro-batches
    fresh: bool                 # a new run directory: not continuing this run's own checkpoint
    notes: list[str]            # shown when the steps start; later phases add theirs
    objective: NextTokenObjective  # what the run optimises (objectives.py)
    base: str                   # where the base weights load from (resolved once: a GGUF
                                # source is hashed to find its conversion)


@dataclass
class TrainData:
    """The tokenized examples and the batches drawn from them."""
    base_path: str              # where the base weights (and tokenizer) come from
    tokenizer: object
    tokenizer_changed: bool     # differs from the base's: saved with the adapter
    train: list[Example]
    eval: list[Example]
    prompts: list[Prompt]
    stats: dataset.DataStats
    stream: BatchStream         # this process's batches, resumable at a Position
    steps: int                  # optimizer steps in the whole run
    fingerprint: str            # of the training data, kept in checkpoints (resume.py)


@dataclass
class TrainModel:
    """The base model with its adapter, ready to train."""
    model: object               # the transformers model under the adapter
    peft_model: object
    packed: bool                # padding-free batches (packing.py)
    initial: dict | None        # the adapter's start point, when the method needs it to save
    trainable: int
    total: int
    peak: memory.PeakMemory     # measured from before the weights load


@dataclass
class Optimization:
    """What each step updates, and the step to start after."""
    loss_module: object         # the objective's, as accelerate prepared it (DDP/FSDP)
    optimizer: object           # accelerate's wrapper; .optimizer is torch's
    scheduler: object
    params: list                # the trainable parameters as prepared: clipped and checked
    start: int                  # the last step already done (0: a new run)


@dataclass
class TrainingState:
    """Everything the setup phases built: what the steps and the finish read."""
    recipe: Recipe
    run: RunSetup
    data: TrainData
    model: TrainModel
    opt: Optimization


# --- the phases, in order -------------------------------------------------------------------

def make_accelerator(recipe: Recipe):
    from accelerate import Accelerator

    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    precision = resolve_precision(recipe.model, recipe.launch, device_type)
    # `accelerate launch` always exports a mixed precision ("no" by default); a recipe left on
    # auto follows it only when the user asked for something explicitly.
    launcher_choice = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    follow_launcher = recipe.launch.mixed_precision == "auto" and launcher_choice != "no"
    try:
        accelerator = Accelerator(
            mixed_precision=None if follow_launcher else precision.mixed_precision,
            **distributed.accelerator_args(recipe, device_type),
            **tracking.accelerator_args(recipe))
    except ValueError as exc:  # accelerate's verdict on the launch or accelerate config
        raise UserError(f"accelerate rejected the setup: {str(exc).strip().splitlines()[0]}") \
            from None
    distributed.activate(accelerator, recipe)
    return accelerator, precision


def total_steps(recipe: Recipe, stream: BatchStream) -> int:
    if recipe.train.max_steps:
        return recipe.train.max_steps
    return max(1, math.floor(recipe.train.epochs * stream.per_epoch / recipe.train.grad_accum))


def setup_run(recipe: Recipe, resume: bool | str, overwrite: bool) -> RunSetup:
    """The accelerator, the run directory and the checkpoint to resume, all checked."""
    from accelerate.utils import set_seed

    # A tiny base is built (once, then cached) before the processes connect: once they have,
    # transformers writes weights on global rank 0 only, and every machine needs its own copy
    # unless they share a filesystem. Concurrent builders are safe (tiny.py renames into place).
    base = base_path(recipe.model)
    acc, precision = make_accelerator(recipe)
    if acc.device.type == "cpu" and not distributed.shards_weights(acc):
        allocator.keep_freed_memory()  # no page faults on each step's fresh tensors
    path = rundir.run_dir(recipe)
    notes = list(precision.notes)
    if recipe.model.adapter_init:
        adapter_init.adapter_folder(recipe.model.adapter_init)  # before any weights load
    quantize.require_bitsandbytes(recipe.model, recipe.adapter, acc.device.type)
    if recipe.hub.push_at_end:
        hub.require_token()  # now, not after hours of training
    resume_from, saved, position = None, None, None
    if resume:
        resume_from, saved = _find_checkpoint(acc, path, resume, overwrite)
        recipe, changed = resuming.check_recipe(resume_from, saved, recipe, acc.num_processes,
                                                path)
        notes += changed
        position = resuming.position(resume_from, saved, recipe, acc.num_processes)
    # A new run directory, unless resuming this run (not when branching off another's).
    fresh = resume_from is None or not resuming.continues(path, resume_from)
    if fresh:
        rundir.check_target(path, overwrite)
    if recipe.model.trust_remote_code and acc.is_main_process:
        print(f"note: model.trust_remote_code=true: running the modelling code shipped with "
              f"{recipe.model.name}", file=sys.stderr, flush=True)
    set_seed(recipe.train.seed)
    objective = objective_for(recipe)  # after a resume adapted the recipe, if it did
    notes += objective.notes()
    return RunSetup(acc, recipe, precision, path, resume_from, saved, position, fresh, notes,
                    objective, base)


def _find_checkpoint(acc, path: Path, resume: bool | str, overwrite: bool) -> tuple[Path, dict]:
    """The checkpoint to resume and its state, found and verified by every process: all of
    them refuse together (none waits forever for the others) when any cannot read it, or
    when machines see different checkpoints (no shared filesystem: each needs a copy)."""
    error = found = saved = None
    try:
        found = resuming.find(path, resume, overwrite)
        saved = checkpoint.verify(found)
    except UserError as exc:
        error = exc
    if acc.num_processes > 1:
        from accelerate.utils import gather_object  # accelerate is loaded already

        seen = gather_object([(None if found is None else found.name, bool(error))])
        ranks = [rank for rank, (_, failed) in enumerate(seen) if failed]
        if error is None and (ranks or len(set(seen)) > 1):
            which = f"process(es) {ranks} cannot read it" if ranks else \
                f"processes see different checkpoints ({sorted({s[0] for s in seen})})"
            raise UserError(f"--resume {found}: {which}; checkpoints are written by the global "
                            "main process (rank 0) only: put the run directory on a filesystem "
                            "every machine shares, or copy it to the same path on each machine")
    if error is not None:
        raise error
    return found, saved


def setup_data(recipe: Recipe, run: RunSetup) -> TrainData:
    """Tokenizer, train/eval examples and this process's batch stream."""
    t, acc = recipe.train, run.accelerator
    base = run.base
    tokenizer, tokenizer_changed = load_tokenizer(base, recipe.model)
    train_ex, eval_ex, prompts, stats = run.objective.build_data(tokenizer)
    try:
        stream = BatchStream(train_ex, t.batch_size, t.seed, acc.process_index,
                             acc.num_processes)
    except ValueError:
        raise UserError(f"data.train: {len(train_ex)} usable rows, fewer than one batch "
                        f"(train.batch_size={t.batch_size} x {acc.num_processes} processes); "
                        "add data or lower train.batch_size") from None
    steps = total_steps(recipe, stream)
    data_fingerprint = resuming.fingerprint(train_ex)
    if run.saved is not None:
        resuming.check_data(run.resume_from, run.saved, data_fingerprint)
    return TrainData(base, tokenizer, tokenizer_changed, train_ex, eval_ex, prompts, stats,
                     stream, steps, data_fingerprint)


def setup_model(recipe: Recipe, run: RunSetup, base: str) -> TrainModel:
    """The base model, prepared for training, with the adapter attached."""
    t, acc = recipe.train, run.accelerator
    peak = memory.PeakMemory(acc.device)  # from here on: the model and its training
    # Under FSDP2 only the main process reads the weights; the others get their shards from
    # it when `prepare` shards the model (distributed.main_loads_alone).
    empty = distributed.main_loads_alone(acc) and not acc.is_main_process
    model = load_model(base, recipe.model, run.precision.dtype, run.precision.compute_dtype,
                       acc.device, say=print if acc.is_main_process else None, empty=empty)
    # Padding-free batches where the attention kernel can keep samples apart (packing.py).
    # (Prompt tuning prepends its virtual tokens to a whole row: its samples cannot share one.)
    method = adapter_method(recipe.adapter)
    packed, note = packing.enable(model, recipe.data.packing and method.packable
                                  and run.objective.packable)
    run.notes += [note] if note else []
    model = prepare_for_training(model, recipe.model, t.gradient_checkpointing)
    peft_model = attach_adapter(model, recipe.adapter)
    if empty:  # the adapter gets storage (small): accelerate maps it to its shards by address
        give_trainable_storage(peft_model)
    if recipe.model.adapter_init:  # SFT, then DPO: continue an existing run's adapter
        adapter_init.load_start(peft_model, recipe.model.adapter_init)
    fused_lora.enable(peft_model)  # LoRA's scaled update added inside its matmul
    if t.compile:  # after peft: the compiled layers include the adapters (compiled.py)
        compiled.compile_layers(model)
    initial = method.initialise(peft_model, recipe.adapter)  # LoftQ; PiSSA/OLoRA start point
    trainable, total = count_parameters(peft_model)
    return TrainModel(model, peft_model, packed, initial, trainable, total, peak)


def setup_optimizer(recipe: Recipe, run: RunSetup, data: TrainData,
                    model: TrainModel) -> Optimization:
    """Optimizer and schedule, prepared by accelerate; with --resume, their saved state and
    the batch stream's position."""
    from transformers import get_scheduler

    t, acc, peft_model = recipe.train, run.accelerator, model.peft_model
    params = [p for p in peft_model.parameters() if p.requires_grad]
    method = adapter_method(recipe.adapter)
    optimizer = method.make_optimizer(peft_model, params, recipe.adapter, t.lr, t.weight_decay)
    # The schedule counts optimizer steps; it is stepped by hand (not `prepare`d), since
    # accelerate's wrapper would step it once per process.
    scheduler = get_scheduler(t.scheduler, optimizer, num_warmup_steps=t.warmup_steps,
                              num_training_steps=data.steps)
    # The reference log-probs (DPO) come from the adapter's start point: before a resumed
    # checkpoint's weights go in, as in the run that wrote it.
    run.objective.prepare(acc, peft_model, data)
    if run.resume_from is not None:  # adapter weights go in before FSDP shards them
        checkpoint.load_adapter(run.resume_from, peft_model)
    loss_module, optimizer = acc.prepare(run.objective.loss_module(peft_model), optimizer)
    # FSDP2 replaces the parameters with sharded ones: clip and check those, not the old.
    params = [p for p in loss_module.parameters() if p.requires_grad]

    start = 0
    if run.resume_from is not None:
        start, _ = checkpoint.load(run.resume_from, optimizer.optimizer, scheduler, acc,
                                   loss_module)
        data.stream.position = run.position
    return Optimization(loss_module, optimizer, scheduler, params, start)
