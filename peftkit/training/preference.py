"""Preference objectives on one adapter: DPO (sigmoid, IPO) and ORPO.

A micro-batch of B pairs is one padded batch of 2B rows, [chosen_1..chosen_B,
rejected_1..rejected_B]: both responses of a pair go through the same forward. Each row is its
own sequence (right padding, masked out of attention), so no sequence sees another.

DPO compares the policy with a reference policy. Here that costs no second model: the
reference log-probabilities of every pair are computed once, before the first step, by the same
weights with the adapter disabled (peft's `disable_adapter()`), or, when the run starts from
an existing adapter (model.adapter_init), by that adapter as loaded, before it trains (the SFT
policy of an SFT-then-DPO run). They are exactly what a frozen copy would give at every step:
the reference never changes, and evaluation runs without dropout.

The formulas follow TRL 1.16 (trl/trainer/dpo_trainer.py, trl/experimental/orpo), which the
tests compare against on identical log-probabilities.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.data.batching import IGNORE, collate
from peftkit.data.preference import PreferencePair
from peftkit.training.loss import HEAD_ONLY_ARCHS


# --- log-probabilities ----------------------------------------------------------------------

def sequence_logps(peft_model, input_ids, attention_mask, labels) -> tuple[torch.Tensor,
                                                                           torch.Tensor]:
    """(summed log-probability of each row's labelled tokens, how many there are), [rows]."""
    targets = labels[:, 1:]
    keep = targets != IGNORE
    base = peft_model.get_base_model()
    if base.config.model_type in HEAD_ONLY_ARCHS:
        # The LM head only where a label exists: prompt and padding positions need no logits.
        hidden = base.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                    use_cache=False).last_hidden_state
        logits = base.get_output_embeddings()(hidden[:, :-1][keep])
        softcap = getattr(base.config, "final_logit_softcapping", None)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
    else:
        logits = peft_model(input_ids=input_ids, attention_mask=attention_mask,
                            use_cache=False).logits[:, :-1][keep]
    token_logps = logits.float().log_softmax(-1).gather(1, targets[keep][:, None])[:, 0]
    rows = keep.nonzero()[:, 0]
    sums = token_logps.new_zeros(input_ids.shape[0]).index_add(0, rows, token_logps)
    return sums, keep.sum(dim=1)


# --- the losses (per pair) ------------------------------------------------------------------

def dpo_losses(chosen, rejected, ref_chosen, ref_rejected, beta: float, variant: str = "sigmoid",
               label_smoothing: float = 0.0, n_chosen=None, n_rejected=None):
    """(per-pair loss, chosen rewards, rejected rewards) from summed log-probs [B]."""
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    if variant == "ipo":
        # TRL normalises IPO's log-ratios by the response length (confirmed with its authors).
        delta = chosen_ratio / n_chosen.clamp(min=1) - rejected_ratio / n_rejected.clamp(min=1)
        losses = (delta - 1 / (2 * beta)) ** 2
    else:
        # Conservative DPO: a label_smoothing share of the preferences assumed flipped.
        delta = chosen_ratio - rejected_ratio
        losses = (-(1 - label_smoothing) * F.logsigmoid(beta * delta)
                  - label_smoothing * F.logsigmoid(-beta * delta))
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation on either side of -ln 2."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)),
                       torch.log(-torch.expm1(x)))


def orpo_losses(chosen_mean, rejected_mean, lam: float):
    """(per-pair odds-ratio loss, chosen rewards, rejected rewards) from the responses'
    *mean* token log-probs [B]; ORPO adds the chosen responses' next-token loss."""
    log_odds = (chosen_mean - rejected_mean) - (log1mexp(chosen_mean) - log1mexp(rejected_mean))
    return -lam * F.logsigmoid(log_odds), lam * chosen_mean.detach(), lam * rejected_mean.detach()


# --- the module the loop trains ---------------------------------------------------------------

class PreferenceLoss(nn.Module):
    """forward(pair batch) -> (the micro-batch's summed per-pair loss, number of pairs): the
    loop divides by the global pair count, as it divides token losses by token counts.

    `last` holds the last forward's per-pair losses and rewards; in training mode `running` sums rewards,
    margins and correct orderings until `take_running()` (the metrics log) reads them."""

    def __init__(self, model: nn.Module, objective: str, beta: float, dpo_loss: str = "sigmoid",
                 label_smoothing: float = 0.0, orpo_lambda: float = 0.1):
        super().__init__()
        self.model = model  # the PeftModel
        self._no_split_modules = getattr(model.get_base_model(), "_no_split_modules", None)
        self.objective, self.beta, self.dpo_loss = objective, beta, dpo_loss
        self.label_smoothing, self.orpo_lambda = label_smoothing, orpo_lambda
        self.last: tuple[torch.Tensor, torch.Tensor] | None = None
        self.running = torch.zeros(4, dtype=torch.float64)  # chosen, rejected, correct, pairs

    def tie_weights(self):
        """Tie the base's embeddings again (a tied model's): accelerate calls this where FSDP2
        moves the model to the meta device and back (main-process loading), which unties them.
        """
        self.model.get_base_model().tie_weights()

    def forward(self, input_ids, attention_mask, labels, ref_chosen=None, ref_rejected=None):
        logps, counts = sequence_logps(self.model, input_ids, attention_mask, labels)
        pairs = input_ids.shape[0] // 2
        chosen, rejected = logps[:pairs], logps[pairs:]
        n_chosen, n_rejected = counts[:pairs], counts[pairs:]
        if self.objective == "orpo":
            losses, r_chosen, r_rejected = orpo_losses(chosen / n_chosen.clamp(min=1),
                                                       rejected / n_rejected.clamp(min=1),
                                                       self.orpo_lambda)
            # ORPO's next-token loss is a token mean over the micro-batch's chosen responses
            # (TRL's), added to every pair: the loop's division by the pair count gives it back.
            losses = losses - chosen.sum() / n_chosen.sum().clamp(min=1)
        else:
            losses, r_chosen, r_rejected = dpo_losses(
                chosen, rejected, ref_chosen, ref_rejected, self.beta, self.dpo_loss,
                self.label_smoothing, n_chosen, n_rejected)
        self.last = (losses.detach(), r_chosen, r_rejected)
        if self.training:
            self.running += _reward_sums(r_chosen, r_rejected).cpu()
        return losses.sum(), torch.tensor(pairs, device=input_ids.device)

    def take_running(self) -> torch.Tensor:
        out, self.running = self.running, torch.zeros(4, dtype=torch.float64)
        return out


def _reward_sums(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    return torch.stack([chosen.sum(), rejected.sum(), (chosen > rejected).sum(),
                        torch.tensor(float(len(chosen)), device=chosen.device)]).double()


def reward_metrics(sums: torch.Tensor, prefix: str = "") -> dict:
    """rewards_chosen, rewards_rejected, reward_margin, preference_accuracy (means over pairs)
    from summed [chosen, rejected, correct, pairs]."""
    chosen, rejected, correct, pairs = (float(x) for x in sums)
    if not pairs:
        return {}
    return {f"{prefix}rewards_chosen": chosen / pairs, f"{prefix}rewards_rejected": rejected / pairs,
            f"{prefix}reward_margin": (chosen - rejected) / pairs,
            f"{prefix}preference_accuracy": correct / pairs}


# --- batches ------------------------------------------------------------------------------------

def collate_pairs(pairs: list[PreferencePair], pad_id: int) -> dict[str, torch.Tensor]:
    """One padded batch: the chosen responses, then the rejected ones, with the reference
    log-probs of each pair."""
    batch = collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
    batch["ref_chosen"] = torch.tensor([p.ref_chosen for p in pairs], dtype=torch.float32)
    batch["ref_rejected"] = torch.tensor([p.ref_rejected for p in pairs], dtype=torch.float32)
    return batch


@torch.no_grad()
def fill_reference(accelerator, peft_model, pairs: list[PreferencePair], batch_size: int,
                   pad_id: int, adapter_is_reference: bool) -> None:
    """Set every pair's reference log-probs: the base with the adapter disabled, or (starting
    from an existing adapter) the adapter as loaded, before any step changes it."""
    was_training = peft_model.training
    peft_model.eval()  # no dropout: the reference is deterministic
    disabled = nullcontext() if adapter_is_reference else peft_model.disable_adapter()
    with disabled, accelerator.autocast():
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            batch = collate_pairs(chunk, pad_id)
            logps, _ = sequence_logps(peft_model, batch["input_ids"].to(accelerator.device),
                                      batch["attention_mask"].to(accelerator.device),
                                      batch["labels"].to(accelerator.device))
            for i, pair in enumerate(chunk):
                pair.ref_chosen = logps[i].item()
                pair.ref_rejected = logps[len(chunk) + i].item()
    peft_model.train(was_training)
