"""The TRL side of `peftkit bench` for DPO recipes: TRL's `DPOTrainer` + peft, as TRL documents
it, on the same model, pairs and hyper-parameters as peftkit.

- The pairs: the selected rows in TRL's conversational preference shape (`prompt` a user turn,
  `chosen`/`rejected` assistant turns: peftkit's reading of the same rows), tokenized by TRL
  with the chat template. TRL 1.16's DPOTrainer takes no pre-tokenized pairs; had its
  tokenization differed from peftkit's, the fingerprints would differ and the comparison be
  refused.
- The reference: `precompute_ref_log_probs=True`, batches of train.batch_size, as peftkit
  computes its reference once before step 1. Without it TRL runs a second, no-grad forward
  with the adapter disabled inside every step: the same reference work over one epoch, but
  inside the timed steps, which would not be the like-for-like step comparison. The reference
  pass is then timed on its own on both sides (`reference_seconds`).
- Padded batches (`padding_free` is disabled in TRL 1.16's DPOTrainer), no gradient
  checkpointing unless the recipe asks (TRL's configs turn it on by default), dropout off,
  TRL's fused LM head (log-probs of the completion positions only).
"""

from __future__ import annotations

import os
import tempfile
import time

import torch

from peftkit.bench.hf import (RecordingCollator, checkpointing_args, load_peft, recorded,
                               step_timer)
from peftkit.bench.same_work import fingerprint, identical_batch
from peftkit.bench.trl_sft import MISSING, _attention, available
from peftkit.model import memory
from peftkit.model.loading import base_path, count_parameters, load_tokenizer, resolve_precision
from peftkit.recipe.schema import Recipe


class PairRecordingCollator(RecordingCollator):
    """TRL's preference collator, recorded: a pair is its two sequences as the collator cuts
    them (prompt + chosen, prompt + rejected, at most max_length each), end to end."""

    def fingerprints(self, features) -> list[str]:
        cut = slice(None, self.collator.max_length)
        return [fingerprint((f["prompt_ids"] + f["chosen_ids"])[cut]
                            + (f["prompt_ids"] + f["rejected_ids"])[cut]) for f in features]


def rows_of(recipe: Recipe) -> list[dict]:
    """The recipe's pairs (data.train, file order) in TRL's conversational preference shape."""
    from peftkit.data.preference import pair_messages
    from peftkit.data.sources import load_records

    rows, _ = load_records(recipe.data.train, recipe.data.skip_bad_rows)
    out = []
    for row in rows:
        prompt, chosen, rejected = pair_messages(row, row.where)
        out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return out


def _config(recipe: Recipe, out: str, precision, device):
    from trl import DPOConfig

    t = recipe.train
    return DPOConfig(
        output_dir=out, per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum, learning_rate=t.lr, max_steps=t.max_steps,
        warmup_steps=t.warmup_steps, lr_scheduler_type=t.scheduler, weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm, seed=t.seed,
        **checkpointing_args(DPOConfig, t.gradient_checkpointing),
        bf16=precision.mixed_precision == "bf16", fp16=precision.mixed_precision == "fp16",
        use_cpu=device.type == "cpu", logging_steps=1, save_strategy="no", report_to="none",
        disable_tqdm=True, dataset_num_proc=None,
        beta=t.beta, loss_type=[t.dpo_loss], max_length=recipe.data.max_len,
        truncation_mode="keep_start", padding_free=False, precompute_ref_log_probs=True,
        precompute_ref_batch_size=t.batch_size)


def run(recipe: Recipe) -> dict:
    """Train `recipe` (train.objective=dpo) with TRL's DPOTrainer; what `peftkit bench`
    compares."""
    if not available():
        raise RuntimeError(MISSING)
    if not torch.cuda.is_available():  # as hf.run: no DeepSpeed accelerator guessing on CPU
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from datasets import Dataset, disable_progress_bars
    from transformers import PrinterCallback, set_seed
    from trl import DPOTrainer

    disable_progress_bars()
    os.environ.setdefault("TQDM_DISABLE", "1")  # the reference precompute's bar

    t = recipe.train
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = resolve_precision(recipe.model, recipe.launch, device.type)
    base = base_path(recipe.model)
    tokenizer, _ = load_tokenizer(base, recipe.model)
    attention = _attention(device)

    set_seed(t.seed)  # as peftkit does before building the adapter: same LoRA init
    peak = memory.PeakMemory(device)
    model = load_peft(recipe, base, precision, attn_implementation=attention)
    timer = step_timer()
    with tempfile.TemporaryDirectory(prefix="peftkit-bench-trl-") as out:
        trainer = DPOTrainer(model=model, args=_config(recipe, out, precision, device),
                             train_dataset=Dataset.from_list(rows_of(recipe)),
                             processing_class=tokenizer, callbacks=[timer])
        collator = PairRecordingCollator(trainer.data_collator)
        trainer.data_collator = collator
        trainer.remove_callback(PrinterCallback)
        trainer.train()
    measured = peak.measured()
    model = trainer.model
    seconds, first = _reference_pass(trainer, collator.collator, t.batch_size)

    def loss():  # TRL's DPO loss, against the reference log-probs just computed
        return trainer.compute_loss(model, trainer._prepare_inputs(dict(first)))

    probe = identical_batch(model, loss)
    pairs = t.batch_size
    return {
        **recorded(timer, collator, t.grad_accum),
        **probe,
        "reference_seconds": seconds,
        "reference_logps": [x for i in range(pairs) for x in
                            (first["ref_chosen_logps"][i].item(),
                             first["ref_rejected_logps"][i].item())],
        "parameters": count_parameters(model),
        "memory": measured,
        "packed": False,
        "settings": {"precompute_ref_log_probs": True, "precompute_ref_batch_size": pairs,
                     "padding_free": False, "loss_type": t.dpo_loss, "beta": t.beta,
                     "max_length": recipe.data.max_len, "attention": attention,
                     "activation_checkpointing": t.gradient_checkpointing,
                     "fused_lm_head": True},
    }


def _reference_pass(trainer, collator, batch_size: int) -> tuple[float, dict]:
    """TRL's reference pass over every pair of the run, timed: its `compute_ref_log_probs` on
    each batch of its collator, as its precompute calls them (without the dataset cache
    write). Returns the seconds and the first batch (the identical batch: the first pairs,
    data order) with these reference log-probs."""
    from torch.utils.data import DataLoader

    loader = DataLoader(trainer.train_dataset, batch_size=batch_size, collate_fn=collator,
                        shuffle=False)
    first = None
    began = time.perf_counter()
    for batch in loader:
        batch = trainer._prepare_inputs(batch)
        chosen, rejected = trainer.compute_ref_log_probs(trainer.model, batch)
        if first is None:
            first = dict(batch, ref_chosen_logps=chosen, ref_rejected_logps=rejected)
    return time.perf_counter() - began, first
