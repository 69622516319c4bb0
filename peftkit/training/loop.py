"""The training loop, top to bottom: setup -> steps -> eval -> save.

Runs the same under `peftkit train` and `accelerate launch -m peftkit train` (1..N processes):
accelerate owns devices, mixed precision and DDP; peft owns the adapter layers.

`train()` is its phases, in order (torchtune's recipe layout): the four setup phases
(setup.py: accelerator and run directory, data, model and adapter, optimizer and resumed
state), `_open_run_dir` (the run's first write), `_run_steps`, then `_finish` (eval, probe,
save, push).
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from peftkit.adapters.registry import adapter_method
from peftkit.data import packing
from peftkit.run.rundir import RunDir
from peftkit.errors import RunError
from peftkit.model import memory
from peftkit.recipe.schema import Recipe
from peftkit.run import card, hub, plot, rundir, tracking
from peftkit.training import checkpoint, distributed, forgetting, signals
from peftkit.training.distributed import full_state_dict
from peftkit.training.evaluation import exact_match
from peftkit.training.progress import TrainProgress
from peftkit.training.setup import (TrainingState, setup_data, setup_model, setup_optimizer,
                                    setup_run)


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
    forgetting: forgetting.Forgetting | None = None  # general-text loss, base vs adapted


def train(recipe: Recipe, source: str = "", *, overwrite: bool = False,
          resume: bool | str = False, console=None) -> RunResult:
    # --- setup: check everything cheap before loading any weights, and write nothing before
    # the inputs have passed: a run that fails to start leaves no run directory behind --------
    run = setup_run(recipe, resume, overwrite)
    recipe = run.recipe  # resuming on another number of processes adapts train.grad_accum
    data = setup_data(recipe, run)
    model = setup_model(recipe, run, data.base_path)
    opt = setup_optimizer(recipe, run, data, model)
    state = TrainingState(recipe, run, data, model, opt)
    show = _announce(state, console)
    result = RunResult(path=run.path, steps=data.steps, trainable=model.trainable,
                       total=model.total, data=data.stats.to_dict())
    if opt.start == 0:
        result.evals["before"] = _evaluate(state)
    # The inputs are good: only now create (or, with --overwrite, replace) the run directory.
    log = _open_run_dir(state, source, overwrite, result.evals.get("before"))

    # --- steps ------------------------------------------------------------------------------
    _run_steps(state, show, log, result)

    # --- eval and save ----------------------------------------------------------------------
    _finish(state, show, log, result)
    return result


def _announce(state: TrainingState, console) -> TrainProgress:
    """The progress display, opened with the notes and a one-line summary of the run."""
    acc, data, model = state.run.accelerator, state.data, state.model
    show = TrainProgress(data.steps, state.opt.start, enabled=acc.is_main_process,
                         log_every=state.recipe.train.log_every, console=console)
    for note in state.run.notes:
        show.note(f"[yellow]note:[/] {note}")
    show.note(f"[bold]{state.recipe.name}[/]: {model.trainable:,} trainable of "
              f"{model.total:,} parameters ({100 * model.trainable / model.total:.2f}%), "
              f"{len(data.train):,} train / {len(data.eval):,} eval samples, {data.steps} "
              f"steps on {acc.num_processes} x {acc.device.type}"
              f"{distributed.sharding_note(acc, state.opt.loss_module)}")
    return show


def _open_run_dir(state: TrainingState, source: str, overwrite: bool,
                  before: dict | None) -> tracking.TrackedLog:
    """Create (or, resuming, reopen) the run directory; the metrics log, first records in."""
    recipe, run, start = state.recipe, state.run, state.opt.start
    acc, main = run.accelerator, run.accelerator.is_main_process
    acc.wait_for_everyone()
    if main:
        rundir.prepare(run.path, overwrite=overwrite, resume=not run.fresh)
        checkpoint.clean_stale(RunDir(run.path).checkpoints)  # left by a crash during a save
    log = tracking.start(acc, recipe, rundir.MetricsLog(run.path, enabled=main))
    if not run.fresh:
        log.truncate_after(start)
        if main:
            rundir.record_resume(run.path, recipe, start)
    elif main:
        rundir.write_recipe(run.path, recipe, source, state.data.base_path)
        log.write(step=0, event="data", **state.data.stats.to_dict())
    if before is not None:
        log.write(step=0, event="eval", **_scalars(before))
    return log


def _run_steps(state: TrainingState, show: TrainProgress, log: tracking.TrackedLog,
               result: RunResult) -> None:
    """The optimizer steps after `start`, with their logs, evals and checkpoints; raises
    TrainingDiverged, or signals.Interrupted (after a checkpoint) on SIGINT/SIGTERM."""
    t, acc, path = state.recipe.train, state.run.accelerator, state.run.path
    data, opt, steps, objective = state.data, state.opt, state.data.steps, state.run.objective
    meta = {"recipe": state.recipe.to_dict(), "data_fingerprint": data.fingerprint}
    # from_pretrained returns the model in eval mode: without this, a run with no eval set
    # would train with dropout and gradient checkpointing silently off.
    opt.loss_module.train()
    tokens_seen, train_time = 0, 0.0
    # SIGINT/SIGTERM during the steps: finish the step, checkpoint, stop (peftkit/signals.py).
    stop = signals.StopRequest()
    for step in stop.steps(range(opt.start + 1, steps + 1)):
        began = time.perf_counter()
        loss, grad_norm, n_useful = _accumulate(state, [data.stream.next()
                                                        for _ in range(t.grad_accum)])
        if not math.isfinite(loss) or (grad_norm is not None and not math.isfinite(grad_norm)):
            show.close()
            raise TrainingDiverged(_diverged_message(step, path))
        opt.optimizer.step()
        opt.scheduler.step()
        opt.optimizer.zero_grad(set_to_none=True)

        result.step_seconds.append(time.perf_counter() - began)
        train_time += result.step_seconds[-1]
        tokens_seen += int(n_useful)
        tps = tokens_seen / train_time
        logged = step % t.log_every == 0 or step == steps
        # The objective's own figures (preference runs: rewards, accuracy) since the last log.
        extra = objective.step_metrics(acc, opt.loss_module) if logged else {}
        show.update(step, loss, tps, opt.scheduler.get_last_lr()[0], extra)
        result.train_loss, result.tokens_per_s = loss, tps
        if logged:
            log.write(step=step, loss=loss, lr=opt.scheduler.get_last_lr()[0],
                      grad_norm=None if grad_norm is None else float(grad_norm),
                      tokens=int(n_useful), tokens_per_s=tps, epoch=data.stream.position.epoch,
                      **extra)
        if t.eval_every and step % t.eval_every == 0 and step != steps and data.eval:
            log.write(step=step, event="eval", **objective.evaluate(
                acc, opt.loss_module, data.eval, t.batch_size, data.tokenizer.pad_token_id))
        signum = stop.requested(acc)  # every process stops after the same step
        if (t.save_every and step % t.save_every == 0) or step == steps or signum:
            _check_finite(acc, opt.params, step, path)  # never checkpoint a broken adapter
            checkpoint.save(RunDir(path).checkpoints, step, data.stream.position,
                            state.model.peft_model, opt.optimizer.optimizer, opt.scheduler, acc,
                            t.keep_checkpoints,
                            full_state_dict(acc, opt.loss_module, state.model.peft_model),
                            extra=meta, optimizer_state=distributed.whole_optimizer_state(
                                acc, opt.loss_module, opt.optimizer.optimizer))
        if signum:
            show.close()
            raise signals.Interrupted(signum, step, RunDir(path).checkpoint(step))
    show.close()


def _accumulate(state: TrainingState, window: list) -> tuple[float, object, float]:
    """Forward and backward over one step's micro-batches; returns (the step's loss, the
    gradient norm, the window's useful tokens over all processes)."""
    acc, opt, world = state.run.accelerator, state.opt, state.run.accelerator.num_processes
    objective = state.run.objective
    # What the loss averages over: labelled tokens (sft), pairs (dpo, orpo).
    counts = torch.tensor(objective.counts(window), device=acc.device)
    n_loss, n_useful = acc.reduce(counts, reduction="sum").tolist()
    loss_total = torch.zeros((), device=acc.device)
    for i, micro in enumerate(window):
        batch = packing.to_device(objective.collate(micro, state.data.tokenizer.pad_token_id,
                                                    state.model.packed), acc.device)
        # Sync gradients across processes only on the window's last micro-batch.
        sync = i == len(window) - 1
        with nullcontext() if sync else acc.no_sync(opt.loss_module):
            loss_sum, _ = opt.loss_module(**batch)
            # The step's loss is the mean over every labelled token (pair) of the global
            # batch: gradients are summed over the window and averaged over processes (hence
            # x world), so each micro-batch contributes its summed loss / global count.
            distributed.backward(acc, loss_sum * world / max(n_loss, 1), last=sync)
        loss_total += loss_sum.detach()
    # Without clipping, an infinite max norm still measures the norm (for the check below).
    # Under DeepSpeed the engine has already clipped and stepped inside the window's last
    # backward; this returns its norm, so a non-finite one stops the run one update late
    # (the adapter is still never written: checkpoints check the weights first).
    grad_norm = acc.clip_grad_norm_(opt.params, state.recipe.train.max_grad_norm or math.inf)
    loss = acc.reduce(loss_total, reduction="sum").item() / max(n_loss, 1)
    return loss, grad_norm, n_useful


def _evaluate(state: TrainingState) -> dict:
    """Held-out loss and, when the recipe asks, exact match of generated answers."""
    t, acc, data = state.recipe.train, state.run.accelerator, state.data
    out = {}
    if data.eval:
        out.update(state.run.objective.evaluate(acc, state.opt.loss_module, data.eval,
                                                t.batch_size, data.tokenizer.pad_token_id))
    if t.eval_generate and data.prompts:
        score, rows = exact_match(acc, state.model.peft_model, data.tokenizer,
                                  data.prompts[:t.eval_generate], t.max_new_tokens)
        out["exact_match"], out["samples"] = score, rows[:3]
    return out


def _finish(state: TrainingState, show: TrainProgress, log: tracking.TrackedLog,
            result: RunResult) -> None:
    """Final eval, the merge probe, memory report; save the adapter and the run's summary
    (main process); push to the Hub when the recipe asks."""
    recipe, run, data, model = state.recipe, state.run, state.data, state.model
    acc, main = run.accelerator, run.accelerator.is_main_process
    result.evals["after"] = _evaluate(state)
    log.write(step=data.steps, event="eval", **_scalars(result.evals["after"]))
    # The trained model's loss on the fixed held-out batch that `peftkit merge` checks merged
    # models against (probe.py): a merge is compared with this model, not only with the files.
    result.probe = run.objective.record_probe(acc, state.opt.loss_module, data.eval,
                                      data.tokenizer.pad_token_id, run.precision,
                                      recipe.model.quantize)
    if forgetting.enabled(recipe):  # has the adapter damaged the base's general ability?
        token_loss = run.objective.token_loss(acc, state.opt.loss_module)
        result.forgetting = forgetting.measure(acc, token_loss, model.peft_model,
                                               data.tokenizer, recipe.train.batch_size)
        alarm = forgetting.warning(result.forgetting, recipe.train.forgetting_warn)
        if alarm:
            show.note(f"[yellow]warning:[/] {alarm}")
    result.memory = memory.report(memory.estimate(recipe, model.model.config, run.precision,
                                                  acc.device.type), model.peak)
    state_dict = full_state_dict(acc, state.opt.loss_module, model.peft_model)
    if main:
        _save_outputs(run.path, recipe, model.peft_model, data.tokenizer,
                      data.tokenizer_changed, result, state_dict, model.initial)
    acc.wait_for_everyone()
    acc.end_training()  # closes the tracker, if any
    result.model = model.peft_model
    if recipe.hub.push_at_end and main:  # a failed push raises hub.PushFailed (exit 1); the
        hub.push(run.path, say=show.note)  # run directory is complete and stays as it is


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
    found = checkpoint.step_dirs(RunDir(path).checkpoints)
    last = f"the last good checkpoint is {found[-1]}" if found else "no checkpoint was written"
    return (f"{what} became non-finite at step {step}; {last}. Lower train.lr or "
            "check the data; no final adapter was written")


def _save_outputs(path: Path, recipe: Recipe, peft_model, tokenizer, tokenizer_changed: bool,
                  result: RunResult, state_dict: dict | None, initial: dict | None) -> None:
    adapter_method(recipe.adapter).save_adapter(peft_model, RunDir(path).adapter, state_dict,
                                                initial)
    if tokenizer_changed:
        tokenizer.save_pretrained(RunDir(path).tokenizer)
    metrics = rundir.read_metrics(path)
    plot.loss_curve(metrics, RunDir(path).loss_plot, title=recipe.name)
    RunDir(path).card.write_text(card.model_card(recipe, result, metrics))
    rundir.write_json(RunDir(path).result_file, {
        "steps": result.steps, "trainable": result.trainable, "total": result.total,
        "train_loss": result.train_loss, "tokens_per_s": result.tokens_per_s,
        "data": result.data, "evals": {k: _scalars(v) for k, v in result.evals.items()},
        "memory": result.memory, "probe": result.probe,
        "forgetting": result.forgetting.to_dict() if result.forgetting else None})
