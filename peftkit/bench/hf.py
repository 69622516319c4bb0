"""The baseline of `peftkit bench`: plain transformers `Trainer` + peft, with their defaults.

What a user would write without peftkit: the base model loaded with `from_pretrained` (default
attention), `get_peft_model` with the same LoRA settings, a padding collator
(`DataCollatorForSeq2Seq`: right padding, label -100 on pads), no packing, full logits and
transformers' own loss. Same samples (the token ids and labels peftkit tokenized), batch size,
accumulation, steps, learning rate, schedule, clipping and seed. `grouped=True` trains the
batches the Trainer's length grouping forms (`train_sampling_strategy="group_by_length"`) over
the whole dataset: `bench.select_samples` orders the samples that way, read sequentially here.

Only official hooks observe the run: a `TrainerCallback` (step times, logged losses) and a
wrapper around the collator (which samples, how many real and padded tokens).
"""

from __future__ import annotations

import os
import tempfile
import time

import torch

from peftkit.data import dataset
from peftkit.model import memory
from peftkit.bench.same_work import fingerprint, identical_batch
from peftkit.recipe.schema import Recipe
from peftkit.adapters.lora import lora_config
from peftkit.model.loading import base_path, count_parameters, load_tokenizer, resolve_precision


class RecordingCollator:
    """Calls `collator` and records, per micro-batch, the samples and real / computed tokens."""

    def __init__(self, collator):
        self.collator = collator
        self.samples: list[list[str]] = []
        self.real: list[int] = []
        self.computed: list[int] = []

    def __call__(self, features):
        batch = self.collator(features)
        self.samples.append(self.fingerprints(features))
        self.real.append(self.real_tokens(features, batch))
        self.computed.append(batch["input_ids"].numel())
        return batch

    def fingerprints(self, features) -> list[str]:
        return [fingerprint(list(f["input_ids"])) for f in features]

    def real_tokens(self, features, batch) -> int:
        return int(batch["attention_mask"].sum())


def step_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.seconds: list[float] = []
            self.losses: list[float] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.last = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            self.seconds.append(now - self.last)
            self.last = now

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    return StepTimer()


def recorded(timer, collator, grad_accum: int) -> dict:
    """What a baseline's step timer and recording collator saw: per optimizer step its time,
    loss and real tokens; the tokens computed; the samples trained."""
    return {
        "step_seconds": timer.seconds,
        "step_loss": timer.losses,
        "step_tokens": [sum(collator.real[i:i + grad_accum])
                        for i in range(0, len(collator.real), grad_accum)],
        "computed_tokens": sum(collator.computed),
        "samples": sorted(s for batch in collator.samples for s in batch),
    }


def load_peft(recipe: Recipe, base: str, precision, **load_kwargs):
    """from_pretrained (quantized as the recipe says) + the plain peft recipe."""
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    from peftkit.model import quantize

    kwargs = dict(load_kwargs)
    if recipe.model.quantize:
        kwargs["quantization_config"] = quantize.bnb_config(recipe.model, precision.compute_dtype)
        if torch.cuda.is_available():  # quantized weights are placed at load time
            kwargs["device_map"] = {"": torch.cuda.current_device()}
    model = AutoModelForCausalLM.from_pretrained(base, dtype=precision.dtype, **kwargs)
    if recipe.model.quantize:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=recipe.train.gradient_checkpointing)
    return get_peft_model(model, lora_config(recipe.adapter))


def checkpointing_args(arguments_class, enabled: bool) -> dict:
    """TrainingArguments for gradient checkpointing (renamed "activation" in transformers 5.2x),
    on or off as the recipe says: always explicit, since TRL's configs default it to on."""
    fields = arguments_class.__dataclass_fields__
    name = "activation_checkpointing" if "activation_checkpointing" in fields else \
        "gradient_checkpointing"
    if not enabled:
        return {name: False}
    return {name: True, f"{name}_kwargs": {"use_reentrant": False}}


def run(recipe: Recipe, grouped: bool = False) -> dict:
    """Train `recipe` with the plain Trainer; the measurements `peftkit bench` compares."""
    if not torch.cuda.is_available():  # the Trainer imports DeepSpeed when it is installed,
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # which would warn while guessing this
    from transformers import (DataCollatorForSeq2Seq, PrinterCallback, Trainer,
                              TrainingArguments, set_seed)

    t = recipe.train
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = resolve_precision(recipe.model, recipe.launch, device.type)
    base = base_path(recipe.model)
    tokenizer, _ = load_tokenizer(base, recipe.model)
    examples, _, _, _ = dataset.build(recipe.data, tokenizer, t.seed)
    features = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]

    set_seed(t.seed)  # as peftkit does before building the adapter: same LoRA init
    peak = memory.PeakMemory(device)
    model = load_peft(recipe, base, precision)
    collator = RecordingCollator(DataCollatorForSeq2Seq(tokenizer, padding=True,
                                                        label_pad_token_id=-100))
    timer = step_timer()
    with tempfile.TemporaryDirectory(prefix="peftkit-bench-hf-") as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=t.batch_size,
            gradient_accumulation_steps=t.grad_accum, learning_rate=t.lr, max_steps=t.max_steps,
            warmup_steps=t.warmup_steps, lr_scheduler_type=t.scheduler,
            weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm, seed=t.seed,
            **checkpointing_args(TrainingArguments, t.gradient_checkpointing),
            bf16=precision.mixed_precision == "bf16", fp16=precision.mixed_precision == "fp16",
            use_cpu=device.type == "cpu", logging_steps=1, save_strategy="no",
            report_to="none", disable_tqdm=True,
            # The samples come in length-grouped order (bench.select_samples): read in order.
            train_sampling_strategy="sequential" if grouped else "random")
        trainer = Trainer(model=model, args=args, train_dataset=features,
                          data_collator=collator, callbacks=[timer])
        trainer.remove_callback(PrinterCallback)  # a printed dict per step; no effect on training
        trainer.train()
    measured = peak.measured()

    # The objective on an identical batch (the first samples, in data order) as this side
    # computes it: its collator, transformers' own loss.
    batch = DataCollatorForSeq2Seq(tokenizer, padding=True)(features[:t.batch_size])
    batch = {k: v.to(model.device) for k, v in batch.items()}
    probe = identical_batch(model, lambda: model(**batch).loss)
    return {
        **recorded(timer, collator, t.grad_accum),
        **probe,
        "parameters": count_parameters(model),
        "memory": measured,
        "packed": False,
    }
