"""What a training run optimises (train.objective), behind one small interface the setup
phases and the loop call: the data it reads, the module that computes the loss, how a
micro-batch is collated and counted, what evaluation and the metrics log report.

`sft` is next-token loss on examples (loss.py); `dpo` and `orpo` are preference losses on
pairs (preference.py). The loop never branches on the objective's name.
"""

from __future__ import annotations

import torch

from peftkit.data import dataset, packing
from peftkit.data import preference as preference_data
from peftkit.data.batching import collate, loss_tokens, useful_tokens
from peftkit.recipe.objective import PREFERENCE_OBJECTIVES
from peftkit.recipe.schema import Recipe
from peftkit.training import preference, probe
from peftkit.training.evaluation import eval_loss, my_share
from peftkit.training.loss import TokenLoss


class NextTokenObjective:
    """train.objective=sft: mean next-token loss over every labelled token."""

    packable = True

    def __init__(self, recipe: Recipe):
        self.recipe = recipe

    def notes(self) -> list[str]:
        return []

    def build_data(self, tokenizer):
        return dataset.build(self.recipe.data, tokenizer, self.recipe.train.seed)

    def loss_module(self, peft_model):
        # train.offload_activations: on CUDA only (a CPU run's activations are there already)
        offload = self.recipe.train.offload_activations and torch.cuda.is_available()
        return TokenLoss(peft_model, offload)

    def prepare(self, accelerator, peft_model, data) -> None:
        """Anything to compute before the first step, with the adapter at its start point."""

    def collate(self, micro: list, pad_id: int, packed: bool) -> dict:
        return (packing.collate_packed if packed else collate)(micro, pad_id)

    def counts(self, window: list[list]) -> tuple[int, int]:
        """(what the step's loss is averaged over, useful tokens) of a window of batches."""
        return (sum(loss_tokens(b) for b in window), sum(useful_tokens(b) for b in window))

    def evaluate(self, accelerator, loss_module, held_out: list, batch_size: int,
                 pad_id: int) -> dict:
        return {"eval_loss": eval_loss(accelerator, loss_module, held_out, batch_size, pad_id)}

    def step_metrics(self, accelerator, loss_module) -> dict:
        return {}

    def token_loss(self, accelerator, loss_module):
        """A next-token loss over the run's model (the forgetting meter's)."""
        return loss_module

    def record_probe(self, accelerator, loss_module, held_out: list, pad_id: int, precision,
                     quantize: str | None) -> dict:
        return probe.record_probe(accelerator, loss_module, held_out, pad_id, precision,
                                  quantize)


class PreferenceObjective(NextTokenObjective):
    """train.objective=dpo or orpo: a loss per prompt/chosen/rejected pair, averaged."""

    packable = False

    def notes(self) -> list[str]:
        if self.recipe.data.packing:
            return [f"train.objective={self.recipe.train.objective}: pairs train in padded "
                    "batches (data.packing does not apply)"]
        return []

    def build_data(self, tokenizer):
        return preference_data.build(self.recipe.data, tokenizer, self.recipe.train.seed)

    def loss_module(self, peft_model):
        t = self.recipe.train
        return preference.PreferenceLoss(peft_model, t.objective, t.beta, t.dpo_loss,
                                         t.label_smoothing, t.orpo_lambda)

    def prepare(self, accelerator, peft_model, data) -> None:
        if self.recipe.train.objective != "dpo":
            return  # ORPO has no reference policy
        preference.fill_reference(accelerator, peft_model, data.train + data.eval,
                                  self.recipe.train.batch_size, data.tokenizer.pad_token_id,
                                  adapter_is_reference=bool(self.recipe.model.adapter_init))

    def collate(self, micro: list, pad_id: int, packed: bool) -> dict:
        return preference.collate_pairs(micro, pad_id)

    def counts(self, window: list[list]) -> tuple[int, int]:
        return sum(len(b) for b in window), sum(useful_tokens(b) for b in window)

    @torch.no_grad()
    def evaluate(self, accelerator, loss_module, held_out: list, batch_size: int,
                 pad_id: int) -> dict:
        """Mean preference loss, rewards and preference accuracy on the held-out pairs."""
        inner = accelerator.unwrap_model(loss_module)
        loss_module.eval()
        mine, real = my_share(held_out, accelerator)
        totals = torch.zeros(5, dtype=torch.float64, device=accelerator.device)
        for start in range(0, len(mine), batch_size):
            chunk = mine[start:start + batch_size]
            keep = max(0, min(len(chunk), real - start))  # my_share's padding counts nothing
            batch = packing.to_device(preference.collate_pairs(chunk, pad_id),
                                      accelerator.device)
            loss_module(**batch)
            losses, chosen, rejected = (r[:keep] for r in inner.last)
            totals[0] += losses.double().sum()
            totals[1:] += preference._reward_sums(chosen, rejected).to(totals.device)
        totals = accelerator.reduce(totals, reduction="sum")
        loss_module.train()
        return {"eval_loss": (totals[0] / totals[4].clamp(min=1)).item(),
                **preference.reward_metrics(totals[1:].cpu())}

    def step_metrics(self, accelerator, loss_module) -> dict:
        sums = accelerator.unwrap_model(loss_module).take_running().to(accelerator.device)
        return preference.reward_metrics(accelerator.reduce(sums, reduction="sum").cpu())

    def token_loss(self, accelerator, loss_module):
        return TokenLoss(accelerator.unwrap_model(loss_module).model)

    def record_probe(self, accelerator, loss_module, held_out: list, pad_id: int, precision,
                     quantize: str | None) -> dict:
        # The merge probe is a next-token loss: on the chosen responses of the held-out
        # pairs, which `peftkit merge` rebuilds the same way (inference/evaluate.eval_data).
        inner = accelerator.unwrap_model(loss_module)
        return probe.record_probe(accelerator, TokenLoss(inner.model),
                                  [pair.chosen for pair in held_out], pad_id, precision,
                                  quantize)


def objective_for(recipe: Recipe) -> NextTokenObjective:
    if recipe.train.objective in PREFERENCE_OBJECTIVES:
        return PreferenceObjective(recipe)
    return NextTokenObjective(recipe)

