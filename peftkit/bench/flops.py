"""Model FLOPs of LoRA training, and the device's measured matmul peak (the MFU denominator).

FLOPs counted per training step, over the work the step actually needs (not what an
implementation happens to spend on padding, or on recomputation under checkpointing):

    4 * N_frozen * tokens            frozen base matmuls: forward 2N, backward input-grad 2N
                                     (a frozen weight needs no weight gradient)
  + 6 * N_adapter * tokens           adapter matmuls (LoRA A and B): forward, input- and
                                     weight-gradient
  + (4 or 6) * H * V * labelled      the LM head, needed only where a token carries loss
                                     (6 if the head itself is trained)
  + 12 * d * layers * pairs          attention scores and values: 4d forward, 8d backward per
                                     causal (query, key) pair within a sample; pairs = sum over
                                     samples of n(n+1)/2, d = heads x head_dim

`tokens` are the real (non-padding) tokens, `labelled` the positions that carry loss. N is
counted from the architecture's linear layers (in x out), so a 4-bit base counts the same as
its unquantized original. Norms, activations, softmax and the optimizer are not counted.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Shape:
    frozen_linear: int  # in x out of the decoder's linear layers (no embeddings, no LM head)
    adapter_linear: int  # adapter matmul parameters inside the decoder
    head: int  # hidden x vocab
    head_trained: bool
    attention_width: int  # heads x head_dim
    layers: int

    def to_dict(self) -> dict:
        return asdict(self)


def shape_of(peft_model) -> Shape:
    """Count from a PeftModel (any device, meta included)."""
    base = peft_model.get_base_model()
    head = base.get_output_embeddings()
    frozen = adapter = 0
    head_modules = set(head.modules()) if head is not None else set()
    for name, module in base.named_modules():
        if module in head_modules:
            continue
        in_f, out_f = getattr(module, "in_features", None), getattr(module, "out_features", None)
        if in_f is None or out_f is None or list(module.children()):
            continue  # only leaf linear layers (a LoRA layer's children are counted instead)
        if "lora_" in name:
            adapter += in_f * out_f
        else:
            frozen += in_f * out_f
    cfg = base.config
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    trained = any(p.requires_grad for p in head.parameters()) if head is not None else False
    return Shape(frozen_linear=frozen, adapter_linear=adapter,
                 head=cfg.hidden_size * cfg.vocab_size, head_trained=trained,
                 attention_width=heads * head_dim, layers=cfg.num_hidden_layers)


def train_flops(shape: Shape, lengths: list[int], labelled: int) -> float:
    """Model FLOPs of one pass (forward + backward) over samples of `lengths` tokens."""
    tokens = sum(lengths)
    pairs = sum(n * (n + 1) // 2 for n in lengths)
    return float((4 * shape.frozen_linear + 6 * shape.adapter_linear) * tokens
                 + (6 if shape.head_trained else 4) * shape.head * labelled
                 + 12 * shape.attention_width * shape.layers * pairs)


def matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32, size: int = 2048,
                repeats: int = 6) -> dict:
    """Best and median FLOP/s of `size`^3 matmuls on `device` (CPU: with torch's threads)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        a @ b
    sync()
    rates = []
    for _ in range(repeats):
        began = time.perf_counter()
        a @ b
        sync()
        rates.append(2 * size ** 3 / (time.perf_counter() - began))
    rates.sort()
    return {"best_flops": rates[-1], "median_flops": rates[len(rates) // 2], "size": size,
            "dtype": str(dtype).removeprefix("torch."), "threads": torch.get_num_threads()}
