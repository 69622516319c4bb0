"""Padding-free micro-batches: a micro-batch's samples concatenated into one row, each sample
attending only to itself.

    [s1 s1 s1 | s2 s2 | s3 s3 s3 s3]   position_ids 0 1 2 | 0 1 | 0 1 2 3

A micro-batch keeps exactly the samples `BatchStream` gives it (so data order, resume
positions, DDP sharding and the loss normalisation are those of padded batches); only the
layout changes: no pad token is ever computed. Three things keep samples apart:

- `position_ids` restart at every sample (RoPE sees each sample from position 0);
- attention runs per sample: `segment_attention`, registered with transformers'
  `AttentionInterface` (its official extension point), reads the sample boundaries from the
  flash-attention-style `cu_seq_lens_q` keyword that transformers passes from the model's
  forward down to every attention call, and runs SDPA on each sample (consecutive samples of
  equal length in one batched call). Without those keywords it is plain SDPA, so padded
  batches and generation behave exactly as with `sdpa`. With flash_attention_2 (GPU) the same
  keywords select its variable-length kernel directly;
- the label at each sample's first token is ignored, so the last token of one sample is never
  asked to predict the first token of the next.

Why not transformers' own packed-sequence mask (SDPA + restarted position_ids, no mask)? It
builds a row x row block-diagonal mask and computes the full row x row attention: measured
15-30% slower than attention per sample on CPU (notes/cpu-probe.md), and it silently stops
isolating samples if a 2D attention mask or a KV cache is present.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from peftkit.data.example import IGNORE, Example

ATTENTION = "peftkit_segments"  # the name registered with transformers' AttentionInterface
# Attention kernels that isolate packed samples given cu_seq_lens; others fall back to padding.
PACKED_KERNELS = ("sdpa", ATTENTION, "flash_attention_2", "flash_attention_3")


def collate_packed(batch: list[Example], pad_id: int | None = None) -> dict:
    """One row holding every sample of `batch`, with the keywords that keep them apart.

    `pad_id` is unused (nothing is padded); it keeps the signature of `batching.collate`."""
    lengths = [len(e.input_ids) for e in batch]
    ids = torch.tensor([t for e in batch for t in e.input_ids], dtype=torch.long)[None]
    labels = torch.tensor([t for e in batch for t in e.labels], dtype=torch.long)[None]
    starts = torch.tensor([0] + lengths[:-1]).cumsum(0)
    labels[0, starts] = IGNORE  # never predict a sample's first token from the previous one
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return {
        "input_ids": ids, "labels": labels, "position_ids": positions,
        # All ones: transformers then builds no mask at all (an all-ones 2D mask also stops it
        # from inferring a block mask from position_ids); segment_attention isolates samples.
        "attention_mask": torch.ones_like(ids),
        "cu_seq_lens_q": cu, "cu_seq_lens_k": cu,
        "max_length_q": max(lengths), "max_length_k": max(lengths),
    }


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def _runs(lengths: list[int]) -> list[tuple[int, int, int]]:
    """(start, count, length) of each run of consecutive equal lengths."""
    runs, start = [], 0
    for n in lengths:
        if runs and runs[-1][2] == n:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1, n)
        else:
            runs.append((start, 1, n))
        start += n
    return runs


def _window_mask(length: int, window: int, device) -> torch.Tensor:
    """Causal sliding-window mask (True = attend), transformers' convention q - kv < window."""
    q = torch.arange(length, device=device)[:, None]
    kv = torch.arange(length, device=device)[None, :]
    return (kv <= q) & (q - kv < window)


def segment_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                      scaling: float | None = None, cu_seq_lens_q=None, sliding_window=None,
                      **kwargs):
    """SDPA run separately on each packed sample ([1, heads, tokens, dim] in, [1, tokens,
    heads, dim] out), or plain transformers SDPA when the batch is not packed."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if cu_seq_lens_q is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, sliding_window=sliding_window, **kwargs)
    if kwargs.get("softcap") is not None:
        raise ValueError("packed attention does not support attention logit soft-capping")
    bounds = cu_seq_lens_q.tolist()
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    gqa = key.shape[1] != query.shape[1]
    runs = _runs(lengths)
    # `split`, not slicing: its backward is one concatenation, where each slice's backward
    # would fill a zero tensor the size of the whole row.
    sizes = [count * length for _, count, length in runs]
    pieces = zip(*(t.squeeze(0).split(sizes, dim=1) for t in (query, key, value)))
    outputs = []
    for (_, count, length), (q, k, v) in zip(runs, pieces):
        # [h, count*length, d] -> [count, h, length, d]: views, no copies.
        q, k, v = (t.unflatten(1, (count, length)).transpose(0, 1) for t in (q, k, v))
        mask = None
        if sliding_window is not None and length > sliding_window:
            mask = _window_mask(length, sliding_window, query.device)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                             scale=scaling, is_causal=mask is None,
                                             enable_gqa=gqa)
        outputs.append(out.transpose(1, 2).reshape(1, count * length, *out.shape[1::2]))
    return torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0], None


def register() -> None:
    """Make `segment_attention` selectable by name (idempotent); padded batches get the same
    masks as SDPA."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    if ATTENTION not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionInterface.register(ATTENTION, segment_attention)
        AttentionMaskInterface.register(ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def enable(model, wanted: bool) -> tuple[bool, str | None]:
    """Switch `model` (a transformers model, before peft wraps it) to packed batches if
    `wanted` and its attention can isolate samples. Returns (packed, note for the user)."""
    if not wanted:
        return False, None
    config = model.config
    kernel = config._attn_implementation
    if kernel not in PACKED_KERNELS or getattr(config, "attn_logit_softcapping", None):
        return False, (f"data.packing: {config.model_type} with {kernel} attention cannot "
                       "keep packed samples apart; using padded batches")
    if kernel == "sdpa":
        register()
        model.set_attn_implementation(ATTENTION)
    return True, None
