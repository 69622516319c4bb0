"""The training loop, top to bottom: setup -> steps -> eval -> save.

Runs the same under `peftkit train` and `accelerate launch -m peftkit train` (1..N processes):
accelerate owns devices, mixed precision and DDP; peft owns the adapter layers.
"""

from __future__ import annotations

import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from peftkit.training import checkpoint
from peftkit.model import compiled
from peftkit.data import dataset
from peftkit.training import distributed
from peftkit.model import fused_lora
from peftkit.adapters.registry import adapter_method
from peftkit.data import packing
from peftkit.training import resume as resuming
from peftkit.run import rundir
from peftkit.training import signals
from peftkit.training.distributed import full_state_dict
from peftkit.data.batching import BatchStream, Position, collate, loss_tokens, useful_tokens
from peftkit.recipe.schema import Recipe
from peftkit.errors import RunError, UserError
from peftkit.training.evaluation import eval_loss, exact_match
from peftkit.training.loss import TokenLoss
from peftkit.model.loading import (attach_adapter, base_path, count_parameters, load_model,
                              load_tokenizer, prepare_for_training, resolve_precision)
from peftkit.run import hub
from peftkit.model import memory
from peftkit.export import merge
from peftkit.model import quantize
from peftkit.run import tracking
from peftkit.training.progress import TrainProgress


class TrainingDiverged(RunError):
    """Loss, gradients or adapter weights became non-finite (exit 1: not the user's input)."""


@dataclass
class RunResult:
    path: Path
    steps: int
    trainable: int
    total: int
    train_loss: float = float("nan")
    tokens_per_s: float = 0.0
    evals: dict = field(default_factory=dict)      # "before"/"after" -> {metric: value}
    data: dict = field(default_factory=dict)
    model: object = field(default=None, repr=False)  # the trained PeftModel, for callers
    step_seconds: list = field(default_factory=list)  # wall time of each step (peftkit bench)
    memory: dict = field(default_factory=dict)  # estimated vs measured peak (memory.report)
    probe: dict = field(default_factory=dict)  # loss on the batch `peftkit merge` checks


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


def evaluate_all(acc, loss_module, peft_model, tokenizer, eval_ex, prompts, recipe) -> dict:
    t = recipe.train
    out = {}
    if eval_ex:
        out["eval_loss"] = eval_loss(acc, loss_module, eval_ex, t.batch_size, tokenizer.pad_token_id)
    if t.eval_generate and prompts:
        score, rows = exact_match(acc, peft_model, tokenizer, prompts[:t.eval_generate],
                                  t.max_new_tokens)
        out["exact_match"], out["samples"] = score, rows[:3]
    return out


def train(recipe: Recipe, source: str = "", *, overwrite: bool = False,
          resume: bool | str = False, console=None) -> RunResult:
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    t = recipe.train
    acc, precision = make_accelerator(recipe)
    main = acc.is_main_process
    path = rundir.run_dir(recipe)

    # --- setup: check everything cheap before loading any weights, and write nothing before
    # the inputs have passed: a run that fails to start leaves no run directory behind --------
    notes = list(precision.notes)
    quantize.require_bitsandbytes(recipe.model, recipe.adapter, acc.device.type)
    if recipe.hub.push_at_end:
        hub.require_token()  # now, not after hours of training
    resume_from = resuming.find(path, resume, overwrite) if resume else None
    saved = checkpoint.verify(resume_from) if resume_from is not None else None
    if saved is not None:
        notes += resuming.check_recipe(resume_from, saved, recipe, acc.num_processes, path)
    # A new run directory, unless resuming this run (not when branching off another's).
    fresh = resume_from is None or not resuming.continues(path, resume_from)
    if fresh:
        rundir.check_target(path, overwrite)
    if recipe.model.trust_remote_code and main:
        print(f"note: model.trust_remote_code=true: running the modelling code shipped with "
              f"{recipe.model.name}", file=sys.stderr, flush=True)
    set_seed(t.seed)
    # A tiny base is built once per machine; transformers writes weights on rank 0 only.
    with acc.local_main_process_first():
        base = base_path(recipe.model)
    tokenizer, tokenizer_changed = load_tokenizer(base, recipe.model)
    train_ex, eval_ex, prompts, stats = dataset.build(recipe.data, tokenizer, t.seed)
    try:
        stream = BatchStream(train_ex, t.batch_size, t.seed, acc.process_index,
                             acc.num_processes)
    except ValueError:
        raise UserError(f"data.train: {len(train_ex)} usable rows, fewer than one batch "
                        f"(train.batch_size={t.batch_size} x {acc.num_processes} processes); "
                        "add data or lower train.batch_size") from None
    steps = total_steps(recipe, stream)
    meta = {"recipe": recipe.to_dict(), "data_fingerprint": resuming.fingerprint(train_ex)}
    if saved is not None:
        resuming.check_data(resume_from, saved, meta["data_fingerprint"])

    peak = memory.PeakMemory(acc.device)  # from here on: the model and its training
    model = load_model(base, recipe.model, precision.dtype, precision.compute_dtype, acc.device,
                       say=print if main else None)
    # Padding-free batches where the attention kernel can keep samples apart (packing.py).
    # (Prompt tuning prepends its virtual tokens to a whole row: its samples cannot share one.)
    method = adapter_method(recipe.adapter)
    packed, note = packing.enable(model, recipe.data.packing and method.packable)
    notes += [note] if note else []
    model = prepare_for_training(model, recipe.model, t.gradient_checkpointing)
    peft_model = attach_adapter(model, recipe.adapter)
    fused_lora.enable(peft_model)  # LoRA's scaled update added inside its matmul
    if t.compile:  # after peft: the compiled layers include the adapters (compiled.py)
        compiled.compile_layers(model)
    initial = method.initialise(peft_model, recipe.adapter)  # LoftQ; PiSSA/OLoRA start point
    trainable, total = count_parameters(peft_model)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = method.make_optimizer(peft_model, params, recipe.adapter, t.lr, t.weight_decay)
    # The schedule counts optimizer steps; it is stepped by hand (not `prepare`d), since
    # accelerate's wrapper would step it once per process.
    scheduler = get_scheduler(t.scheduler, optimizer, num_warmup_steps=t.warmup_steps,
                              num_training_steps=steps)
    if resume_from is not None:  # adapter weights go in before FSDP shards them
        checkpoint.load_adapter(resume_from, peft_model)
    loss_module, optimizer = acc.prepare(TokenLoss(peft_model), optimizer)
    # FSDP2 replaces the parameters with sharded ones: clip and check those, not the old.
    params = [p for p in loss_module.parameters() if p.requires_grad]

    start = 0
    if resume_from is not None:
        start, stream.position = checkpoint.load(resume_from, optimizer.optimizer, scheduler,
                                                 acc)

    show = TrainProgress(steps, start, enabled=main, log_every=t.log_every, console=console)
    for note in notes:
        show.note(f"[yellow]note:[/] {note}")
    show.note(f"[bold]{recipe.name}[/]: {trainable:,} trainable of {total:,} parameters "
              f"({100 * trainable / total:.2f}%), {len(train_ex):,} train / {len(eval_ex):,} "
              f"eval samples, {steps} steps on {acc.num_processes} x {acc.device.type}"
              f"{distributed.sharding_note(acc, loss_module)}")
    result = RunResult(path=path, steps=steps, trainable=trainable, total=total,
                       data=stats.to_dict())
    if start == 0:
        result.evals["before"] = evaluate_all(acc, loss_module, peft_model, tokenizer, eval_ex,
                                              prompts, recipe)

    # The inputs are good: only now create (or, with --overwrite, replace) the run directory.
    acc.wait_for_everyone()
    if main:
        rundir.prepare(path, overwrite=overwrite, resume=not fresh)
        checkpoint.clean_stale(path / "checkpoints")  # left by a crash during a save
    log = tracking.start(acc, recipe, rundir.MetricsLog(path, enabled=main))
    if not fresh:
        log.truncate_after(start)
        if main:
            rundir.record_resume(path, recipe, start)
    elif main:
        rundir.write_recipe(path, recipe, source, base)
        log.write(step=0, event="data", **stats.to_dict())
    if "before" in result.evals:
        log.write(step=0, event="eval", **_scalars(result.evals["before"]))

    # --- steps ------------------------------------------------------------------------------
    # from_pretrained returns the model in eval mode: without this, a run with no eval set
    # would train with dropout and gradient checkpointing silently off.
    loss_module.train()
    world = acc.num_processes
    tokens_seen, train_time = 0, 0.0
    # SIGINT/SIGTERM during the steps: finish the step, checkpoint, stop (peftkit/signals.py).
    stop = signals.StopRequest()
    for step in stop.steps(range(start + 1, steps + 1)):
        began = time.perf_counter()
        window = [stream.next() for _ in range(t.grad_accum)]
        counts = torch.tensor([sum(loss_tokens(b) for b in window),
                               sum(useful_tokens(b) for b in window)], device=acc.device)
        n_loss, n_useful = acc.reduce(counts, reduction="sum").tolist()
        loss_total = torch.zeros((), device=acc.device)
        for i, micro in enumerate(window):
            collate_fn = packing.collate_packed if packed else collate
            batch = packing.to_device(collate_fn(micro, tokenizer.pad_token_id), acc.device)
            # Sync gradients across processes only on the window's last micro-batch.
            sync = i == len(window) - 1
            with nullcontext() if sync else acc.no_sync(loss_module):
                loss_sum, _ = loss_module(**batch)
                # The step's loss is the mean over every labelled token of the global batch:
                # gradients are summed over the window and averaged over processes (hence
                # x world), so each micro-batch contributes its summed loss / global count.
                distributed.backward(acc, loss_sum * world / max(n_loss, 1), last=sync)
            loss_total += loss_sum.detach()
        # Without clipping, an infinite max norm still measures the norm (for the check below).
        # Under DeepSpeed the engine has already clipped and stepped inside the window's last
        # backward; this returns its norm, so a non-finite one stops the run one update late
        # (the adapter is still never written: checkpoints check the weights first).
        grad_norm = acc.clip_grad_norm_(params, t.max_grad_norm or math.inf)
        loss = acc.reduce(loss_total, reduction="sum").item() / max(n_loss, 1)
        if not math.isfinite(loss) or (grad_norm is not None and not math.isfinite(grad_norm)):
            show.close()
            raise TrainingDiverged(_diverged_message(step, path))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        result.step_seconds.append(time.perf_counter() - began)
        train_time += result.step_seconds[-1]
        tokens_seen += int(n_useful)
        tps = tokens_seen / train_time
        show.update(step, loss, tps, scheduler.get_last_lr()[0])
        result.train_loss, result.tokens_per_s = loss, tps
        if step % t.log_every == 0 or step == steps:
            log.write(step=step, loss=loss, lr=scheduler.get_last_lr()[0],
                      grad_norm=None if grad_norm is None else float(grad_norm),
                      tokens=int(n_useful), tokens_per_s=tps, epoch=stream.position.epoch)
        if t.eval_every and step % t.eval_every == 0 and step != steps:
            log.write(step=step, event="eval", eval_loss=eval_loss(
                acc, loss_module, eval_ex, t.batch_size, tokenizer.pad_token_id)) \
                if eval_ex else None
        signum = stop.requested(acc)  # every process stops after the same step
        if (t.save_every and step % t.save_every == 0) or step == steps or signum:
            _check_finite(acc, params, step, path)  # never checkpoint a broken adapter
            checkpoint.save(path / "checkpoints", step, stream.position, peft_model,
                            optimizer.optimizer, scheduler, acc, t.keep_checkpoints,
                            full_state_dict(acc, loss_module, peft_model), extra=meta)
        if signum:
            show.close()
            raise signals.Interrupted(signum, step, path / "checkpoints" / f"step-{step}")
    show.close()

    # --- eval and save ----------------------------------------------------------------------
    result.evals["after"] = evaluate_all(acc, loss_module, peft_model, tokenizer, eval_ex,
                                         prompts, recipe)
    log.write(step=steps, event="eval", **_scalars(result.evals["after"]))
    # The trained model's loss on the fixed held-out batch that `peftkit merge` checks merged
    # models against (merge.py): a merge is compared with this model, not only with the files.
    result.probe = merge.record_probe(acc, loss_module, eval_ex, tokenizer.pad_token_id,
                                      precision, recipe.model.quantize)
    result.memory = memory.report(memory.estimate(recipe, model.config, precision), peak)
    state_dict = full_state_dict(acc, loss_module, peft_model)
    if main:
        _save_outputs(path, recipe, peft_model, tokenizer, tokenizer_changed, result,
                      state_dict, initial)
    acc.wait_for_everyone()
    acc.end_training()  # closes the tracker, if any
    result.model = peft_model
    if recipe.hub.push_at_end and main:  # a failed push raises hub.PushFailed (exit 1); the
        hub.push(path, say=show.note)    # run directory is complete and stays as it is
    return result


def _scalars(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


def _check_finite(acc, params, step: int, path: Path) -> None:
    """Raise TrainingDiverged if any adapter weight is inf or NaN (on any process)."""
    local = [distributed.local(p) for p in params]  # FSDP / ZeRO-3: this process's part
    bad = torch.stack([(~torch.isfinite(x.detach())).any() for x in local]).sum().float()
    if acc.num_processes > 1:
        bad = acc.reduce(bad.to(acc.device), reduction="sum")
    if bad.item():
        raise TrainingDiverged(_diverged_message(step, path, "adapter weights"))


def _diverged_message(step: int, path: Path, what: str = "loss or gradients") -> str:
    found = checkpoint.step_dirs(path / "checkpoints")
    last = f"the last good checkpoint is {found[-1]}" if found else "no checkpoint was written"
    return (f"{what} became non-finite at step {step}; {last}. Lower train.lr or "
            "check the data; no final adapter was written")


def _save_outputs(path: Path, recipe: Recipe, peft_model, tokenizer, tokenizer_changed: bool,
                  result: RunResult, state_dict: dict | None, initial: dict | None) -> None:
    from peftkit.run import card
    from peftkit.run import plot

    adapter_method(recipe.adapter).save_adapter(peft_model, path / "adapter", state_dict,
                                                initial)
    if tokenizer_changed:
        tokenizer.save_pretrained(path / "tokenizer")
    metrics = rundir.read_metrics(path)
    plot.loss_curve(metrics, path / "loss.png", title=recipe.name)
    (path / "README.md").write_text(card.model_card(recipe, result, metrics))
    rundir.write_json(path / "result.json", {
        "steps": result.steps, "trainable": result.trainable, "total": result.total,
        "train_loss": result.train_loss, "tokens_per_s": result.tokens_per_s,
        "data": result.data, "evals": {k: _scalars(v) for k, v in result.evals.items()},
        "memory": result.memory, "probe": result.probe})
