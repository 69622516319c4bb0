"""Quantized bases through bitsandbytes (QLoRA): what the recipe asks for, as a
`BitsAndBytesConfig`; the checks that must fail before any weights load; and the preparation of
a loaded k-bit base for training.

bitsandbytes owns the quantization and peft the k-bit preparation; this module translates the
recipe and wraps the one shortfall peftkit has to work around (`keep_cpu_layout_trainable`).
"""

from __future__ import annotations

import torch

from peftkit.recipe.schema import Lora, Model
from peftkit.errors import UserError

FOUR_BIT = ("nf4", "fp4")
INSTALL_HINT = "pip install 'peftkit[qlora]'"


def require_bitsandbytes(model: Model, adapter: Lora, device_type: str) -> None:
    """Raise a UserError, before any weights load, when the installed bitsandbytes cannot
    serve `model.quantize` on `device_type` (or not with this adapter)."""
    if not model.quantize:
        return
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise UserError(f"model.quantize={model.quantize}: bitsandbytes is not installed "
                        f"({exc}); {INSTALL_HINT}, or train unquantized (model.quantize=none)") \
            from None
    except Exception as exc:  # noqa: BLE001 - a broken native library raises anything
        raise UserError(f"model.quantize={model.quantize}: bitsandbytes failed to load "
                        f"({type(exc).__name__}: {exc}); reinstall it ({INSTALL_HINT})") from None
    version = getattr(bnb, "__version__", "?")
    # Releases from before bitsandbytes' multi-backend work have no such set: CUDA only.
    supported = getattr(bnb, "supported_torch_devices", {"cuda"})
    if device_type not in supported:
        raise UserError(f"model.quantize={model.quantize}: the installed bitsandbytes {version} "
                        f"cannot run on {device_type} (it supports {', '.join(sorted(supported))});"
                        " upgrade it (0.50 runs 4- and 8-bit on CPU) or train unquantized "
                        "(model.quantize=none)")
    if model.quantize == "int8" and adapter.use_dora and device_type == "cpu":
        # Measured with bitsandbytes 0.50: after DoRA's no-grad weight-norm pass the CPU 8-bit
        # layer loses its scales, and the next training forward fails.
        raise UserError("adapter.use_dora=true with model.quantize=int8 fails on CPU "
                        f"(bitsandbytes {version}); use model.quantize=nf4, or a GPU")


def compute_dtype(model: Model, device_type: str, bf16_ok: bool) -> tuple[str, list[str]]:
    """The dtype 4-bit layers compute in, and notes for the run log. On CPU, float32: a bf16
    matmul there is an order of magnitude slower (measured ~13x on bitsandbytes 0.50)."""
    if model.quantize not in FOUR_BIT:
        return "", []
    chosen = model.compute_dtype
    notes = []
    if chosen == "auto":
        chosen = "bfloat16" if bf16_ok else "float32"
    elif device_type == "cpu" and chosen != "float32":
        notes.append(f"model.compute_dtype={chosen} on CPU: using float32 (much faster there)")
        chosen = "float32"
    how = f" (model.compute_dtype=auto on {device_type})" * (model.compute_dtype == "auto")
    notes.append(f"{model.quantize} base{' with double quantization' * model.double_quant}: "
                 f"4-bit layers compute in {chosen}{how}")
    return chosen, notes


def bnb_config(model: Model, compute: torch.dtype | None):
    """The transformers `BitsAndBytesConfig` for `model.quantize` (None when unquantized)."""
    from transformers import BitsAndBytesConfig

    if not model.quantize:
        return None
    if model.quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    storage = "uint8" if model.quant_storage == "auto" else model.quant_storage
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=model.quantize,
        bnb_4bit_use_double_quant=model.double_quant,
        bnb_4bit_compute_dtype=compute or torch.float32,
        bnb_4bit_quant_storage=getattr(torch, storage))


def prepare_for_kbit_training(base, upcast_unquantized: bool = False):
    """Freeze every base weight of a loaded k-bit base for adapter training.

    `upcast_unquantized`: also upcast the unquantized 16-bit weights (embeddings, norms, LM head)
    to float32, as peft's `prepare_model_for_kbit_training` does. Off by default: the stored
    weights are 16-bit already, so the upcast adds no information; it doubles their memory
    (Llama-3.1-8B: 1.96 GiB more) and makes the residual stream, hence every checkpointed
    activation, float32. What it changes in the loss is measured in docs/qlora-and-memory.md.
    Gradient checkpointing is left to `loading.prepare_for_training`, the one place that turns
    it on."""
    if upcast_unquantized:
        from peft import prepare_model_for_kbit_training

        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    else:
        for param in base.parameters():
            param.requires_grad_(False)
    keep_cpu_layout_trainable(base)  # done by modeling.load_model too; here for other bases
    return base


def keep_cpu_layout_trainable(base) -> int:
    """Stop bitsandbytes from repacking 4-bit weights into its CPU inference layout.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a `Linear4bit` weight in place the first
    time the layer runs in eval mode without gradients (our held-out evaluation). Backward
    through the repacked weight is not implemented (no autograd kernel for `gemv_4bit`): every
    later training step silently gets no gradient below the first 4-bit layer it reaches, so
    only the top adapters learn. Turning the layer's own switch off keeps the trainable layout.

    The repacked layer also computes differently: its kernel rounds the activations and the
    absmax to bfloat16, whatever the compute dtype. `modeling.load_model` therefore switches
    every quantized base it loads (training, `peftkit merge`, eval, generate), so that a model
    reloaded from a run computes what training computed. Measured on SmolLM2-135M nf4 (CPU,
    float32 compute): the probe loss of the reloaded adapter moved 1.3% with the bf16 kernel
    (0.95129 vs 0.93893 recorded), 0 without it.
    Returns the number of layers switched.
    """
    switched = 0
    for module in base.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            switched += 1
    return switched

