"""Training memory: an estimate from the model config and the recipe, before anything loads,
and the measured peak of a run, so each run checks the estimate (result.json, `memory`).

The estimate adds up what one process holds at the peak of a training step:

- base weights at their stored size. 4-bit: 0.5 byte/param plus one absmax per 64-value
  block (4 bytes; with double quantization 1 byte plus a float32 per 256 blocks). int8: 1
  byte/param plus a float32 scale per output row. bitsandbytes quantizes `nn.Linear` layers
  only and skips the LM head (and weights tied to it), so embeddings, norms and the head keep
  model.dtype (float32 with model.upcast_unquantized, as peft's k-bit preparation does);
- adapter weights, their gradients and AdamW's two states: float32, 16 bytes per parameter;
- activations saved for backward. Per token and decoder layer, in values (h hidden size,
  a = heads x head_dim, I = MLP width), counted from what autograd saves in a Llama layer:
  4h (input and output of both norms) + 4a (attention's q, k, v, output; k and v at full
  width, as transformers repeats grouped KV heads when a batch is padded) + 4I (gate, up,
  activation, product) + r per adapted linear + with padded (not packed) batches max_len
  (SDPA's additive mask) + with LoRA dropout each adapted linear's dropped input and its
  1-byte mask. Gradient checkpointing keeps only each layer's input (h), and with an int8
  base also the inputs of its 8-bit layers (2h + a + I: bitsandbytes keeps them on the
  autograd context, out of checkpointing's reach). Plus 2h for the final norm. With
  train.offload_activations on a GPU these wait in CPU memory (offload.py): the GPU holds
  one layer's input at a time;
- the backward working set: the larger of the logits of the labelled positions (peftkit runs
  the LM head only there, in chunks of at most CHUNK_LOGITS logits, head_loss.py: logits,
  softmax and gradient of one chunk in float32, plus the hidden-state gradient of every
  position) and one layer's backward
  (its recompute under checkpointing, hidden- and MLP-sized gradients, one quantized weight
  dequantized). Backward frees the logits before it reaches the layers, so never both.

Assumptions: every micro-batch holds `train.batch_size` x `data.max_len` tokens, all of them
labelled (an upper bound for short or completion-only data). Activations take 2 bytes when
the residual stream is 16-bit: 16-bit weights or autocast, unless a quantized base's
unquantized weights are upcast (then embeddings and norms keep a float32 residual stream);
else 4. Not counted: python and torch themselves, the tokenized data, the CUDA context, and
allocator caching or fragmentation (CPU RSS: see docs/qlora-and-memory.md, "Memory estimate
vs measured").
"""

from __future__ import annotations

import copy
import os
import resource
import sys
from dataclasses import dataclass, field

import torch

from peftkit.adapters.registry import adapter_method
from peftkit.model import allocator
from peftkit.model.loading import attach_adapter
from peftkit.model.sharded import plain_construction
from peftkit.recipe.schema import Recipe

try:
    from peftkit.model.head_loss import CHUNK_LOGITS
except ImportError:  # a loss that holds every logit at once
    CHUNK_LOGITS = 0

GB = 1024 ** 3


@dataclass
class Estimate:
    parts: dict[str, int]             # component -> bytes, in display order
    notes: dict[str, str]             # component -> how it was counted
    precision: str                    # e.g. "float32 weights, float32 activations"
    assumptions: list[str] = field(default_factory=list)
    offloaded: int = 0                # bytes kept in CPU memory (train.offload_activations)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def to_dict(self) -> dict:
        return {"total_bytes": self.total, "parts_bytes": dict(self.parts),
                "precision": self.precision, "offloaded_bytes": self.offloaded}


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype, device="meta").element_size()


def quantized_bytes(numel: int, rows: int, quantize: str, double_quant: bool) -> int:
    """Stored bytes of one linear weight of `numel` values (`rows` output rows)."""
    if quantize == "int8":
        return numel + 4 * rows                       # int8 values + float32 scale per row
    blocks = -(-numel // 64)                          # bitsandbytes' 4-bit block size
    data = -(-numel // 2) + 16 * 4                    # two values per byte + the 16-value code
    if double_quant:                                  # absmax as uint8 + float32 per 256 blocks
        return data + blocks + 4 * -(-blocks // 256) + 256 * 4 + 4
    return data + 4 * blocks


def _skipped_by_bitsandbytes(model) -> list[str]:
    """Module names transformers keeps unquantized (the LM head, tied and fp32-kept ones)."""
    try:
        from transformers.quantizers.base import get_keys_to_not_convert
        return get_keys_to_not_convert(model) + list(model._keep_in_fp32_modules or [])
    except (ImportError, AttributeError):  # moved in some transformers release: the usual set
        return ["lm_head"]


def _converted(name: str, skip: list[str]) -> bool:
    try:
        from transformers.quantizers.quantizers_utils import should_convert_module
        return should_convert_module(name, skip)
    except ImportError:
        return not any(name == s or name.endswith("." + s) for s in skip)


def base_bytes(model, recipe: Recipe, weight_dtype: torch.dtype) -> tuple[int, int, int]:
    """(quantized linear bytes, other weight bytes, largest quantized weight in values)."""
    from torch import nn

    m = recipe.model
    quantized_ids, quantized, largest = set(), 0, 0
    if m.quantize:
        skip = _skipped_by_bitsandbytes(model)
        for name, module in model.named_modules():
            if type(module) is nn.Linear and _converted(name, skip):
                w = module.weight
                quantized += quantized_bytes(w.numel(), w.shape[0], m.quantize, m.double_quant)
                quantized_ids.add(id(w))
                largest = max(largest, w.numel())
    other_size = 4 if _upcast(recipe) else _size(weight_dtype)
    other = sum(p.numel() * other_size for p in model.parameters() if id(p) not in quantized_ids)
    return quantized, other, largest


def _upcast(recipe: Recipe) -> bool:
    """Whether k-bit preparation upcasts the unquantized weights to float32."""
    return bool(recipe.model.quantize and recipe.model.upcast_unquantized)


@dataclass(frozen=True)
class ValueBytes:
    """Bytes per saved activation value, by where it comes from."""
    residual: int  # the residual stream: layer inputs, norms (float32 from upcast embeddings)
    matmul: int    # matmul outputs: attention, MLP, LoRA A (16-bit under 16-bit autocast)
    autocast: bool  # 16-bit autocast: a float32 input to LoRA's A is saved as a 16-bit copy

    def describe(self) -> str:
        if self.residual == self.matmul:
            return "16-bit activations" if self.matmul == 2 else "float32 activations"
        return "float32 residual stream, 16-bit matmul outputs"


def value_bytes(recipe: Recipe, precision) -> ValueBytes:
    """The residual stream is 16-bit with 16-bit weights, unless a quantized base's embeddings
    and norms are upcast; matmuls give 16-bit outputs under 16-bit autocast."""
    autocast = precision.mixed_precision in ("bf16", "fp16")
    residual = 2 if _size(precision.dtype) == 2 and not _upcast(recipe) else 4
    return ValueBytes(residual, 2 if autocast else residual, autocast)


# LoRA layers whose input is a matmul output rather than a norm's (Llama-style names).
_FED_BY_A_MATMUL = ("o_proj", "down_proj", "out_proj", "dense")


def activation_bytes_per_token(config, recipe: Recipe, adapted: dict,
                               size: ValueBytes = ValueBytes(4, 4, False)) -> dict[str, float]:
    """Saved-for-backward bytes per token of one decoder layer (see the module doc);
    `adapted`: {name: LoRA layer} of one decoder layer."""
    h = config.hidden_size
    heads = config.num_attention_heads
    a = heads * (getattr(config, "head_dim", None) or h // heads)
    inter = getattr(config, "intermediate_size", None) or 4 * h
    lora = recipe.adapter.r * len(adapted)
    copies = 0.0
    if recipe.adapter.dropout > 0:  # each dropped input (saved by A) and its 1-byte mask
        copies = sum(_in_features(mod) for mod in adapted.values()) * (size.matmul + 1)
    elif size.autocast and size.residual > size.matmul:  # A keeps a 16-bit copy of a float32
        copies = size.matmul * sum(_in_features(mod) for name, mod in adapted.items()  # input
                                   if not name.endswith(_FED_BY_A_MATMUL))
    # Padded batches: SDPA keeps an additive mask (max_len values per token) in every layer.
    mask = 0 if getattr(recipe.data, "packing", False) else recipe.data.max_len
    checkpoint = h * size.residual
    if recipe.model.quantize == "int8":
        # bitsandbytes' 8-bit matmul keeps its input on the autograd context, where
        # checkpointing cannot drop it: the attention and MLP inputs, o_proj's and down_proj's.
        checkpoint += 2 * h * size.residual + (a + inter) * size.matmul
    layer = 4 * h * size.residual + (4 * a + 4 * inter + lora + mask) * size.matmul + copies
    return {"layer": layer, "checkpoint": checkpoint}


def _in_features(mod) -> int:
    base = mod.get_base_layer()
    return getattr(base, "in_features", 0) or base.weight.shape[1]


def estimate(recipe: Recipe, config, precision, device_type: str) -> Estimate:
    """Peak training memory of one process for `recipe` on `config` (a transformers config),
    with `precision` from `loading.resolve_precision` for the target device (`device_type`:
    activations are offloaded on CUDA only)."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(config)  # a loaded base's config may say how it was quantized
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"), plain_construction():
        model = AutoModelForCausalLM.from_config(config)
        quantized, other, largest = base_bytes(model, recipe, precision.dtype)
        peft_model = attach_adapter(model, recipe.adapter)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    size = value_bytes(recipe, precision)
    compute = _size(precision.compute_dtype) if precision.compute_dtype else size.matmul

    parts, notes = {}, {}
    m = recipe.model
    if m.quantize:
        parts["base: quantized linears"] = quantized
        notes["base: quantized linears"] = m.quantize + " + double quant" * (
            m.double_quant and m.quantize != "int8")
        parts["base: other weights"] = other
        notes["base: other weights"] = "embeddings, norms, LM head in " + (
            "float32 (upcast)" if _upcast(recipe) else _dtype_name(precision.dtype))
    else:
        parts["base weights"] = other
        notes["base weights"] = _dtype_name(precision.dtype)
    for name, per_param, note in (
            ("adapter weights", 4, f"{trainable:,} trainable params, float32"),
            ("adapter gradients", 4, "float32"),
            ("AdamW states", 8, "2 x float32 per trainable param")):
        parts[name], notes[name] = per_param * trainable, note
    names = {id(mod): name for name, mod in peft_model.named_modules()}
    adapted = {names[id(mod)]: mod for mod in
               adapter_method(recipe.adapter).layers_saving_activations(peft_model)}
    offload = recipe.train.offload_activations and device_type == "cuda"
    act_parts, offloaded = _activation_parts(config, recipe, adapted, size, largest * compute,
                                             offload)
    for name, (nbytes, note) in act_parts.items():
        parts[name], notes[name] = int(nbytes), note
    t, d = recipe.train, recipe.data
    return Estimate(parts, notes, f"{_dtype_name(precision.dtype)} weights, {size.describe()}",
                    [f"micro-batch {t.batch_size} x {d.max_len} tokens, all labelled"],
                    int(offloaded))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _activation_parts(config, recipe: Recipe, adapted: dict, size: ValueBytes,
                      dequantized: int, offload: bool) -> tuple[dict[str, tuple[float, str]], float]:
    """({"activations": (bytes, how), "backward working set": (bytes, which)}, bytes
    offloaded to CPU memory)."""
    t = recipe.train
    tokens = t.batch_size * recipe.data.max_len
    layers, h = config.num_hidden_layers, config.hidden_size
    inter = getattr(config, "intermediate_size", None) or 4 * h
    per = activation_bytes_per_token(config, recipe, adapted, size)
    kept = per["checkpoint"] if t.gradient_checkpointing else per["layer"]
    # + the final norm's input and output
    saved = tokens * (layers * kept + 2 * h * size.residual)
    how = (f"{layers} layer inputs (gradient checkpointing)" if t.gradient_checkpointing else
           f"{layers} layers x {per['layer']:,.0f} B/token") + f" x {tokens:,} tokens"
    offloaded = 0.0
    if offload:  # in CPU memory until backward; the GPU holds the one being used
        offloaded, saved = saved, tokens * kept
        how = f"one layer's, the rest ({human(offloaded)}) offloaded to CPU memory"
    # Backward frees the logits before it reaches the decoder layers: the peak holds either
    # the logits with their gradient, or one layer's backward, not both.
    vocab = config.vocab_size
    # peftkit's head loss goes through the labelled positions in chunks of CHUNK_LOGITS
    # logits (head_loss.py); a chunk holds logits, softmax and gradient at most, and the
    # hidden-state gradient of every position is kept.
    chunk = min(tokens * vocab, CHUNK_LOGITS or tokens * vocab)
    logits = chunk * 12 + (tokens * h * size.residual if chunk < tokens * vocab else 0)
    # A layer's backward needs all it saved: recomputed under checkpointing, copied back
    # from CPU memory when offloaded, or (neither) already counted in the activations.
    rebuilt = t.gradient_checkpointing or offload
    layer = (per["layer"] * rebuilt + 2 * h * size.residual + 2 * inter * size.matmul) * tokens \
        + dequantized
    if logits >= layer:
        chunked = f" in chunks of {chunk:,}" if chunk < tokens * vocab else ""
        working = (logits, f"logits of {tokens:,} labelled positions x vocab {vocab:,}{chunked}"
                           f" (logits, softmax, gradient: 3 x float32) > one layer's "
                           f"backward {human(layer)}")
    else:
        what = " with its recompute" if t.gradient_checkpointing else \
            " with its reloaded activations" if offload else ""
        working = (layer, f"one layer's backward{what} > logits {human(logits)}")
    return {"activations": (saved, how), "backward working set": working}, offloaded


# ---------------------------------------------------------------------------------------------
# What the device offers, and what a run measured.

def device_total(device_type: str) -> tuple[int, str]:
    """(bytes, description) of the memory a run would use: the GPU's, or system RAM."""
    if device_type == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return props.total_memory, f"{props.name} memory"
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "system RAM"
    except (ValueError, OSError, AttributeError):
        return 0, "system RAM (unknown)"


def _maxrss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def _current_rss() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        try:
            import psutil
            return psutil.Process().memory_info().rss
        except ImportError:
            return None


def _reset_peak_rss() -> bool:
    """Linux: restart the kernel's peak-RSS counter (what ru_maxrss reports) from now."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory of this process from construction on.

    CUDA: `torch.cuda.max_memory_allocated` above what was allocated at the start. CPU: peak
    RSS (`ru_maxrss`) above the RSS at the start; on Linux the kernel's peak counter is reset
    at the start, elsewhere ru_maxrss is the whole process's peak, so earlier work can hide in
    it. RSS also counts allocator caching and library workspaces, which the estimate does not.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(device)
            self.baseline = torch.cuda.memory_allocated(device)
            self.method = "torch.cuda.max_memory_allocated above the allocation at start"
        else:
            allocator.release_free_memory()  # earlier work's freed memory is not this run's
            self.faults = _page_faults()
            self.reset = _reset_peak_rss()
            current = _current_rss()
            self.baseline = current if current is not None else _maxrss_bytes()
            self.method = ("peak RSS (ru_maxrss, counter reset at start) above the RSS at start"
                           if self.reset else "process peak RSS (ru_maxrss) above the RSS at start")

    def measured(self) -> dict:
        peak = torch.cuda.max_memory_allocated(self.device) if self.cuda else _maxrss_bytes()
        out = {"peak_bytes": peak, "baseline_bytes": self.baseline,
               "above_baseline_bytes": max(0, peak - self.baseline), "method": self.method}
        if self.cuda:  # what the caching allocator held at most (nvidia-smi's share of it)
            out["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(self.device)
        else:  # fresh pages the kernel had to supply: memory churn, which costs
            out["page_faults"] = _page_faults() - self.faults  # differently on each host
        return out


def _page_faults() -> int:
    """Minor page faults of this process so far (each one a fresh page handed out)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def report(estimate: Estimate, peak: PeakMemory) -> dict:
    """The `memory` entry of result.json: estimate, measurement and their ratio."""
    measured = peak.measured()
    ratio = measured["above_baseline_bytes"] / estimate.total if estimate.total else None
    return {"estimate": estimate.to_dict(), "measured": measured,
            "measured_over_estimate": ratio}


def human(n: float) -> str:
    """Bytes in binary units (GiB = 1024**3 bytes), as torch.cuda reports memory."""
    for unit, scale in (("GiB", GB), ("MiB", 1024 ** 2), ("KiB", 1024)):
        if abs(n) >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{n:,.0f} B"
