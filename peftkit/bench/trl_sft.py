"""The strongest peer of `peftkit bench` (`--vs trl`): TRL's `SFTTrainer` + peft on its
documented fast path. Needs the optional extra `peftkit[bench]` (trl==1.16.0).

What TRL gets, and why:
- The same samples, as token ids and loss mask: peftkit's tokenization of each sample
  (`input_ids`, and `completion_mask` = 1 where peftkit's label is not -100: the completion and
  its EOS), TRL's documented pre-tokenized input, with `completion_only_loss=True`. TRL then
  trains exactly the tokens peftkit trains (its own tokenization of the text would be a
  different sample set, which `equal_work` refuses).
- Packing with `packing_strategy="bfd"` (best-fit decreasing), which turns on padding-free
  batches: each micro-batch is one row, samples kept apart by `position_ids` (on CPU and with
  sdpa, transformers builds the block-diagonal mask from them; with flash attention, the
  varlen kernel uses them). The labels of each sample's first token are masked, so no sample
  is scored on predicting another's start. TRL's fused LM head (always on in 1.16) computes
  log-probabilities of the labelled positions only, in tiles.
- The same optimizer steps: one packed row per micro-batch, `steps x grad_accum` rows in all;
  the row length is the smallest that makes bfd pack the samples into exactly that many rows
  (`row_length`), so a step trains on average the tokens a peftkit step does. A user's
  max_length=1024 with several rows per micro-batch would change the number of optimizer
  steps, not the computation per token: padding-free flattens a micro-batch into one row.
- On CUDA, what TRL recommends there besides packing: flash attention
  (`attn_implementation="flash_attention_2"`) when the flash-attn package is installed (else
  sdpa; the side records which). The Hub kernels TRL also suggests need network access.
- No `torch.compile` (TRL does not turn it on; peftkit's recipe compiles decoder layers when
  train.compile is set): the comparison is each tool as its documentation has it.

Same base, adapter (hf.load_peft: `get_peft_model` with the recipe's LoRA), learning rate,
schedule, clipping and seed as the Trainer baseline (hf.py); observed with the same official
hooks (a `TrainerCallback`, a wrapper around the collator).
"""

from __future__ import annotations

import importlib.util
import os
import tempfile

import torch

from peftkit.bench.hf import (RecordingCollator, checkpointing_args, load_peft, recorded,
                               step_timer)
from peftkit.bench.same_work import fingerprint, identical_batch
from peftkit.data import dataset
from peftkit.data.example import IGNORE
from peftkit.model import memory
from peftkit.model.loading import base_path, count_parameters, load_tokenizer, resolve_precision
from peftkit.recipe.schema import Recipe

MISSING = ("the trl side needs TRL: pip install 'peftkit[bench]' (trl==1.16.0)")


def available() -> bool:
    return importlib.util.find_spec("trl") is not None


class PackedRecordingCollator(RecordingCollator):
    """TRL's collator, recorded: the samples are split at the packed rows' `seq_lengths`, and
    a padding-free batch has no attention mask (every token is real)."""

    def fingerprints(self, features) -> list[str]:
        samples = []
        for f in features:
            ids, start = list(f["input_ids"]), 0
            for n in f["seq_lengths"]:
                samples.append(fingerprint(ids[start:start + n]))
                start += n
        return samples

    def real_tokens(self, features, batch) -> int:
        return sum(len(f["input_ids"]) for f in features)


def features_of(examples) -> list[dict]:
    """peftkit's samples as TRL's pre-tokenized prompt-completion input."""
    return [{"input_ids": list(e.input_ids),
             "completion_mask": [int(label != IGNORE) for label in e.labels]} for e in examples]


def row_length(features: list[dict], rows: int) -> int:
    """The smallest packed-row length with which TRL's bfd packing makes exactly `rows` rows
    of these samples (none cut: at least the longest sample)."""
    from datasets import Dataset
    from trl.data_utils import pack_dataset

    lengths = [len(f["input_ids"]) for f in features]
    data = Dataset.from_list([{"input_ids": f["input_ids"]} for f in features])
    longest, total = max(lengths), sum(lengths)
    length = max(longest, -(-total // rows))
    while length <= total:
        made = len(pack_dataset(data, length, "bfd"))
        if made == rows:
            return length
        if made < rows:
            break
        length += max(1, length // 200)
    raise ValueError(f"TRL's bfd packing cannot put these {len(features)} samples into exactly "
                     f"{rows} rows; change --steps")


def _attention(device: torch.device) -> str:
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def _config(recipe: Recipe, out: str, length: int, precision, device):
    from trl import SFTConfig

    t = recipe.train
    return SFTConfig(
        output_dir=out, per_device_train_batch_size=1, gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr, max_steps=t.max_steps, warmup_steps=t.warmup_steps,
        lr_scheduler_type=t.scheduler, weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm, seed=t.seed,
        **checkpointing_args(SFTConfig, t.gradient_checkpointing),
        bf16=precision.mixed_precision == "bf16", fp16=precision.mixed_precision == "fp16",
        use_cpu=device.type == "cpu", logging_steps=1, save_strategy="no", report_to="none",
        disable_tqdm=True,
        packing=True, packing_strategy="bfd", max_length=length, completion_only_loss=True,
        dataset_num_proc=None)


def run(recipe: Recipe) -> dict:
    """Train `recipe` with TRL's SFTTrainer; the measurements `peftkit bench` compares."""
    if not available():
        raise RuntimeError(MISSING)
    if not torch.cuda.is_available():  # as hf.run: no DeepSpeed accelerator guessing on CPU
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from datasets import Dataset, disable_progress_bars
    from transformers import PrinterCallback, set_seed
    from trl import SFTTrainer

    disable_progress_bars()  # TRL maps the 64 samples four times; a bar each is noise

    t = recipe.train
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = resolve_precision(recipe.model, recipe.launch, device.type)
    base = base_path(recipe.model)
    tokenizer, _ = load_tokenizer(base, recipe.model)
    examples, _, _, _ = dataset.build(recipe.data, tokenizer, t.seed)
    features = features_of(examples)
    length = row_length(features, t.max_steps * t.grad_accum)
    attention = _attention(device)

    set_seed(t.seed)  # as peftkit does before building the adapter: same LoRA init
    peak = memory.PeakMemory(device)
    model = load_peft(recipe, base, precision, attn_implementation=attention)
    timer = step_timer()
    with tempfile.TemporaryDirectory(prefix="peftkit-bench-trl-") as out:
        trainer = SFTTrainer(model=model, args=_config(recipe, out, length, precision, device),
                             train_dataset=Dataset.from_list(features),
                             processing_class=tokenizer, callbacks=[timer])
        collator = PackedRecordingCollator(trainer.data_collator)
        trainer.data_collator = collator
        trainer.remove_callback(PrinterCallback)
        trainer.train()
    measured = peak.measured()

    # The objective on an identical batch (the first samples, in data order) as TRL computes
    # it: the features it trained on, labelled by its own dataset preparation (unpacked: the
    # samples stay whole and in order), one padding-free row through its collator, its loss
    # (fused LM head).
    first = trainer._prepare_dataset(Dataset.from_list(features[:t.batch_size]), tokenizer,
                                     trainer.args, False, None, "identical batch")
    batch = collator.collator([dict(row, seq_lengths=[len(row["input_ids"])]) for row in first])
    model = trainer.model

    def loss():
        return trainer.compute_loss(model, trainer._prepare_inputs(dict(batch)))

    probe = identical_batch(model, loss)
    per_step = t.grad_accum
    return {
        **recorded(timer, collator, per_step),
        "step_samples": [sum(len(s) for s in collator.samples[i:i + per_step])
                         for i in range(0, len(collator.samples), per_step)],
        **probe,
        "parameters": count_parameters(model),
        "memory": measured,
        "packed": True,
        "settings": {"packing_strategy": "bfd", "row_length": length, "rows_per_micro_batch": 1,
                     "attention": attention, "completion_only_loss": True,
                     "fused_lm_head": True},
    }
