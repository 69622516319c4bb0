"""Summed cross-entropy of a vocabulary-sized LM head, without ever holding every logit.

The logits of a batch are `labelled positions x vocabulary` fp32 values: with a 32k vocabulary
and 4k labelled positions, 0.5 GB for the logits alone, again for their softmax saved for
backward, and again for their gradient. `head_loss` goes through the positions in chunks of a
fixed number of logits instead:

- a frozen plain `nn.Linear` head (the LoRA case): one pass per chunk computes the loss *and*
  the gradient with respect to the hidden states (softmax - one-hot, times the head weight), so
  backward only scales a saved `positions x hidden` tensor; no logits outlive their chunk and
  nothing is recomputed;
- any other head (trained in full via modules_to_save, LoRA on the head, logit soft-capping,
  sharded weights): each chunk runs under activation checkpointing, i.e. its logits are
  recomputed in backward (one extra head forward).

Small batches (at most one chunk) take the plain path: one matmul, one cross-entropy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

CHUNK_LOGITS = 8 * 2**20  # fp32 logits per chunk: 32 MiB


class _FrozenLinearCE(torch.autograd.Function):
    """sum_i CE(hidden_i @ W^T, target_i) with dL/dhidden computed chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, rows: int):
        need_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(hidden) if need_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], rows):
            h, t = hidden[start:start + rows], targets[start:start + rows]
            logits = (h @ weight.T).float()
            picked = logits.gather(1, t[:, None])[:, 0]
            # log-sum-exp and softmax from one exp pass, in place: exp(logits - max) / sum.
            top = logits.amax(dim=-1, keepdim=True)
            exp = logits.sub_(top).exp_()
            sums = exp.sum(dim=-1, keepdim=True)
            total += (top + sums.log() - picked[:, None]).sum()
            if need_grad:
                probs = exp.div_(sums)
                probs[torch.arange(len(t), device=t.device), t] -= 1  # softmax - one-hot
                grad[start:start + rows] = probs.to(weight.dtype) @ weight
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad,) = ctx.saved_tensors
        return grad * grad_total.to(grad.dtype), None, None, None


def _plain(head: nn.Module, hidden, targets, softcap: float | None):
    logits = head(hidden)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def _fusable(head: nn.Module) -> bool:
    weight = getattr(head, "weight", None)
    return (type(head) is nn.Linear and head.bias is None and not weight.requires_grad
            # a sharded weight (FSDP DTensor, ZeRO-3 partition): the module gathers it
            and not hasattr(weight, "device_mesh") and not hasattr(weight, "ds_id"))


def head_loss(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
              softcap: float | None = None, chunk_logits: int = CHUNK_LOGITS) -> torch.Tensor:
    """Summed next-token cross-entropy of `head(hidden)` against `targets` ([N, H], [N])."""
    vocab = head.out_features if hasattr(head, "out_features") else head.weight.shape[0]
    rows = max(1, chunk_logits // vocab)
    if hidden.shape[0] <= rows:
        return _plain(head, hidden, targets, softcap)
    if _fusable(head) and not softcap:
        return _FrozenLinearCE.apply(hidden, head.weight, targets, rows)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], rows):
        total = total + checkpoint(_plain, head, hidden[start:start + rows],
                                   targets[start:start + rows], softcap, use_reentrant=False)
    return total
