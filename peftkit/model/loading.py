"""Load the base model and tokenizer a recipe names, and attach its adapter through peft."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from peftkit.adapters.registry import adapter_method
from peftkit.model import quantize
from peftkit.recipe.schema import Launch, Lora, Model
from peftkit.errors import UserError
from peftkit.model.sharded import name_cpu_for_deepspeed, numel, quiet_progress
from peftkit.model.tiny import tokenizer_dir
from peftkit.model import sources

# Tokenizers that ship without a chat template (base models) get peftkit's own: a plain,
# prefix-stable "User:/Assistant:" layout (the one the tiny models use).
DEFAULT_CHAT_TEMPLATE = (tokenizer_dir() / "chat_template.jinja").read_text()
PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "[PAD]", "<|endoftext|>",
                  "<unk>")


@dataclass
class Precision:
    dtype: torch.dtype
    mixed_precision: str  # accelerate's value: no | bf16 | fp16
    notes: list[str] = field(default_factory=list)
    compute_dtype: torch.dtype | None = None  # of 4-bit layers; None when not 4-bit


def resolve_precision(model: Model, launch: Launch, device_type: str,
                      bf16_ok: bool | None = None) -> Precision:
    """Weight dtype and autocast for this device. CPU always trains in fp32: this CPU class
    has no bf16 units, and bf16 there is an order of magnitude slower. `bf16_ok` overrides
    the probe of this machine's GPU (memory estimates for a GPU elsewhere)."""
    if bf16_ok is None:
        bf16_ok = device_type == "cuda" and torch.cuda.is_bf16_supported()
    notes = []
    dtype = model.dtype
    if dtype == "auto":
        dtype = "bfloat16" if bf16_ok else "float32"
    elif device_type == "cpu" and dtype != "float32":
        notes.append(f"model.dtype={dtype} on CPU: using float32")
        dtype = "float32"
    mixed = launch.mixed_precision
    if mixed == "auto":
        mixed = "bf16" if bf16_ok else "no"
    elif device_type == "cpu" and mixed != "no":
        notes.append(f"launch.mixed_precision={mixed} on CPU: using no (fp32)")
        mixed = "no"
    compute, quant_notes = quantize.compute_dtype(model, device_type, bf16_ok)
    return Precision(getattr(torch, dtype), mixed, notes + quant_notes,
                     getattr(torch, compute) if compute else None)


def base_path(model: Model) -> str:
    """Where the base weights come from: a local directory (tiny form, converted GGUF, the
    user's own) or a Hub id (peftkit/model/sources.py)."""
    return sources.resolve(model)


def _offline_error(what: str, name: str, exc: Exception) -> UserError:
    return UserError(f"cannot load {what} {name!r}: {type(exc).__name__}: "
                     f"{str(exc).splitlines()[0] if str(exc) else ''} — the Hugging Face Hub "
                     "may be unreachable; use a local path, or model.tiny=true for the offline "
                     "tiny form")


def load_tokenizer(path: str, model: Model):
    """The tokenizer, with a pad token that is not EOS and a chat template.

    Returns (tokenizer, changed): `changed` means it differs from the base's and must be saved
    with the run. The pad id only fills positions that are masked out of attention and loss,
    so reusing an existing token never needs new embedding rows.
    """
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, revision=model.revision,
                                            trust_remote_code=model.trust_remote_code)
    except OSError as exc:
        raise _offline_error("the tokenizer of", path, exc) from exc
    changed = False
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        vocab = tok.get_vocab()
        pad = next((t for t in PAD_CANDIDATES if t in vocab and vocab[t] != tok.eos_token_id),
                   None)
        if pad is None:
            raise UserError(f"tokenizer of {path!r} has no pad token distinct from EOS; add one "
                            "(e.g. tokenizer.add_special_tokens) and point model.name at it")
        tok.pad_token = pad
        changed = True
    if not tok.chat_template:
        tok.chat_template = DEFAULT_CHAT_TEMPLATE
        changed = True
    return tok, changed


def load_model(path: str, model: Model, dtype: torch.dtype,
               compute_dtype: torch.dtype | None = None, device=None,
               say: Callable[[str], None] | None = None, empty: bool = False):
    """The base model; with `model.quantize`, loaded quantized by bitsandbytes straight onto
    `device` (quantized weights cannot be moved there afterwards); with `empty`, only built,
    its parameters on the meta device (`_build_empty`).

    transformers' "Loading weights" bar stays off: a tiny base loads in milliseconds, and a
    real one gets one line of peftkit's own through `say` (when given) instead."""
    from transformers import AutoModelForCausalLM

    name_cpu_for_deepspeed()
    attn = None if model.attn_implementation == "auto" else model.attn_implementation
    if empty:
        return _ready(_build_empty(path, model, dtype, attn), model)
    quantized = {}
    if model.quantize:
        quantized = {"quantization_config": quantize.bnb_config(model, compute_dtype)}
        if device is not None:
            quantized["device_map"] = {"": device}
    if say is not None and not model.tiny:
        say(f"loading the base weights: {path}{_size_note(path)}")
    try:
        with quiet_progress():
            base = AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, attn_implementation=attn, revision=model.revision,
                trust_remote_code=model.trust_remote_code, **quantized)
    except OSError as exc:
        raise _offline_error("model", path, exc) from exc
    except ValueError as exc:
        raise _attention_error(exc, attn) from exc
    if model.quantize:
        # Every 4-bit forward, trained or not, runs the kernels training ran: without this,
        # bitsandbytes switches a CPU layer to its bf16 inference kernel the first time it runs
        # without gradients, and a reloaded model no longer computes what training recorded.
        quantize.keep_cpu_layout_trainable(base)
    return _ready(base, model)


def _build_empty(path: str, model: Model, dtype: torch.dtype, attn: str | None):
    """The base's modules with no weights read and no memory for its parameters (meta
    device), for a process that receives its shards from the main one (FSDP2's
    cpu_ram_efficient_loading). Buffers are built for real: the non-persistent ones (rotary
    frequencies) are computed, not loaded, and accelerate does not broadcast them."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path, revision=model.revision,
                                            trust_remote_code=model.trust_remote_code)
    except OSError as exc:
        raise _offline_error("model", path, exc) from exc
    try:
        with init_empty_weights(include_buffers=False):
            base = AutoModelForCausalLM.from_config(
                config, dtype=dtype, attn_implementation=attn,
                trust_remote_code=model.trust_remote_code)
    except ValueError as exc:
        raise _attention_error(exc, attn) from exc
    # Inside the block every parameter assigned is replaced by a new meta one, tied ones too
    # (the embeddings and the LM head of a tied model): tie them again.
    base.tie_weights()
    return base


def _attention_error(exc: ValueError, attn: str | None) -> Exception:
    """transformers' refusal of an attention kernel as a UserError; any other ValueError
    as it is."""
    if "attention implementation" not in str(exc):
        return exc
    return UserError(f"model.attn_implementation={attn}: not supported by this architecture; "
                     "use auto or eager")


def _ready(base, model: Model):
    # Training never uses a KV cache; with one, packed samples would attend to each other.
    base.config.use_cache = False
    # peft names the base in adapter_config.json after this: the Hub id, even when the
    # weights came from a converted GGUF in peftkit's cache.
    base.name_or_path = sources.hub_id(model) or base.name_or_path
    return base


def _size_note(path: str) -> str:
    """The size of a local folder of weights, as " (16.1 GB)"; "" for a Hub id (its size is
    not known before it downloads, and the download shows its own bar)."""
    folder = Path(path)
    if not folder.is_dir():
        return ""
    size = sum(f.stat().st_size for f in folder.iterdir() if f.suffix in (".safetensors", ".bin"))
    if not size:
        return ""
    return f" ({size / 1e9:.1f} GB)" if size >= 1e9 else f" ({size / 1e6:.0f} MB)"


def prepare_for_training(base, model: Model, gradient_checkpointing: bool):
    """Ready a loaded base for adapter training. The one place that decides both k-bit
    preparation and gradient checkpointing (peft's k-bit helper would otherwise turn
    checkpointing on by itself, through a deprecated transformers call)."""
    if model.quantize:
        base = quantize.prepare_for_kbit_training(base, model.upcast_unquantized)
    if gradient_checkpointing:
        # Non-reentrant: works with frozen inputs and does not warn; transformers still hooks
        # the embedding output to require grad ("input grads"), which is harmless here.
        kwargs = {"use_reentrant": False}
        if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.2x
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return base


def attach_adapter(base, adapter: Lora):
    """Wrap `base` in a PeftModel: base weights frozen, adapter weights trainable."""
    from peft import get_peft_model

    try:
        config = adapter_method(adapter).peft_config(adapter, base.config.model_type)
        return get_peft_model(base, config)
    except ValueError as exc:  # peft names the unmatched target modules
        raise UserError(f"adapter.targets={adapter.targets!r}: {str(exc).splitlines()[0]}") \
            from exc


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""

    trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(numel(p) for p in model.parameters())
    return trainable, total
