"""What `peftkit merge` measures: the logits and probe loss of a model on the probe batch, how
two such measurements differ, and, for a 4/8-bit run, which weights to merge into (the base's
original-precision weights, or the same weights quantized and dequantized as the trained model
held them), chosen by those measurements."""

from __future__ import annotations

import hashlib

import torch

from peftkit.data.batching import IGNORE
from peftkit.training.probe import dtype_name as _name


@torch.no_grad()
def forward(model, batch: dict, device) -> tuple[torch.Tensor, float]:
    """(float32 logits at the real (unpadded) positions, mean loss over labelled tokens)."""
    import torch.nn.functional as F

    model.eval()
    mask = batch["attention_mask"].to(device)
    logits = model(input_ids=batch["input_ids"].to(device), attention_mask=mask,
                   use_cache=False).logits.float()
    labels = batch["labels"].to(device)[:, 1:]
    keep = labels != IGNORE
    loss = F.cross_entropy(logits[:, :-1][keep], labels[keep]).item()
    return logits[mask.bool()].cpu(), loss


def deviation(ref: tuple, got: tuple) -> dict:
    diff = (got[0] - ref[0]).abs()
    return {"max_abs_logit_diff": diff.max().item(), "mean_abs_logit_diff": diff.mean().item(),
            "greedy_agreement": (got[0].argmax(-1) == ref[0].argmax(-1)).float().mean().item(),
            "max_abs_logit": ref[0].abs().max().item(), "reference_loss": ref[1],
            "merged_loss": got[1]}


TARGETS = {"original": "the base's original-precision weights",
           "dequantized": "the base's weights as the quantized model computed with them "
                          "(quantized and dequantized)"}


def quantized_weights(model) -> dict[str, dict]:
    """Each bitsandbytes-quantized weight of `model` (by module name): how it was quantized
    and a digest of its dequantized values, to check a re-quantization against."""
    import bitsandbytes as bnb

    found = {}
    for name, module in model.named_modules():  # bitsandbytes' layers, not peft's wrappers
        if not isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            continue
        weight = module.weight
        kind = "4bit" if isinstance(module, bnb.nn.Linear4bit) else "8bit"
        info = {"kind": kind, "shape": tuple(weight.shape)}
        if kind == "4bit":  # packed: the layer's shape is in the quantization state
            q = weight.quant_state
            info.update(shape=tuple(q.shape), dtype=q.dtype, blocksize=q.blocksize,
                        quant_type=q.quant_type, nested=bool(q.nested),
                        storage=weight.data.dtype)
        found[name] = {**info, "digest": _digest(_dequantize(module))}
    return found


def _dequantize(module) -> torch.Tensor:
    from peft.utils.integrations import dequantize_bnb_weight

    return dequantize_bnb_weight(module.weight, getattr(module, "state", None))


def _requantized(weight: torch.Tensor, info: dict, device) -> torch.Tensor:
    """`weight` quantized the way bitsandbytes quantized it at load time, and dequantized."""
    import bitsandbytes.functional as bnbf

    if info["kind"] == "4bit":
        w = weight.detach().to(device=device, dtype=info["dtype"]).contiguous()
        packed, state = bnbf.quantize_4bit(w, blocksize=info["blocksize"],
                                           compress_statistics=info["nested"],
                                           quant_type=info["quant_type"],
                                           quant_storage=info["storage"])
        return bnbf.dequantize_4bit(packed, state)
    w = weight.detach().to(device=device, dtype=torch.float16).contiguous()
    codes, scales, _ = bnbf.int8_vectorwise_quant(w)
    return bnbf.int8_vectorwise_dequant(codes, scales)


def _digest(tensor: torch.Tensor) -> str:
    data = tensor.detach().contiguous().cpu().view(torch.uint8).numpy()
    return hashlib.sha256(data).hexdigest()


def _dequantize_in_place(model, quantized: dict[str, dict], device) -> tuple[str | None, int]:
    """Replace each quantized weight of the unquantized `model` by its dequantized value, as
    the quantized model held it. Returns (None, or why it cannot be done, how many weights
    were replaced: when any, the original weights must be loaded again to be used)."""
    if not quantized:
        return "no quantized weights were found in the quantized model", 0
    for done, (name, info) in enumerate(quantized.items()):
        try:
            module = model.get_submodule(name)
        except AttributeError:
            return f"{name}: not in the unquantized model", done
        if tuple(module.weight.shape) != info["shape"]:
            return f"{name}: shape {tuple(module.weight.shape)}, quantized {info['shape']}", done
        values = _requantized(module.weight, info, device)
        if _digest(values) != info["digest"]:
            return (f"{name}: quantizing the {_name(module.weight.dtype)} weights again does "
                    "not reproduce the quantized model's weights"), done
        with torch.no_grad():
            module.weight.copy_(values.to(module.weight.device, module.weight.dtype))
    return None, len(quantized)


def _target_figures(ref: tuple, got: tuple) -> dict:
    dev = deviation(ref, got)
    return {"probe_loss": got[1], "reference_loss": ref[1],
            "loss_change": got[1] - ref[1],
            **{k: dev[k] for k in ("max_abs_logit_diff", "mean_abs_logit_diff",
                                    "greedy_agreement")}}


def choose_target(model, adapter_ref: tuple, quantized_ref: tuple, batch: dict, device,
                   quantized: dict, quant_device, quantize: str):
    """Measure both merge targets (the adapter on each, against the adapter on the quantized
    base). `model` holds the original weights on entry (`adapter_ref`: its logits) and the
    dequantized ones on return, as far as they could be made. Returns (the report's "target",
    notes, the adapter logits on the chosen weights, or None when `model` no longer holds
    them: the original weights must then be loaded again)."""
    figures = {"original": _target_figures(quantized_ref, adapter_ref)}
    notes = []
    why_not, replaced = _dequantize_in_place(model, quantized, quant_device)
    if why_not is None:
        dequantized_ref = forward(model, batch, device)
        figures["dequantized"] = _target_figures(quantized_ref, dequantized_ref)
    else:
        notes.append(f"merge target: the {quantize}-dequantized weights were not measured "
                     f"({why_not}); merged into the original weights")
    chosen = min(figures, key=lambda t: figures[t]["mean_abs_logit_diff"])
    if chosen == "dequantized":
        chosen_ref = dequantized_ref
    else:
        chosen_ref = None if replaced else adapter_ref
    parts = [f"{t}: probe loss {f['probe_loss']:.5f}, max |logit diff| "
             f"{f['max_abs_logit_diff']:.3g}, mean {f['mean_abs_logit_diff']:.3g}, greedy "
             f"agreement {100 * f['greedy_agreement']:.1f}%" for t, f in figures.items()]
    summary = (f"{chosen}, {TARGETS[chosen]}; the adapter on each target vs on the "
               f"{quantize} base (probe loss {quantized_ref[1]:.5f}): " + "; ".join(parts))
    target = {"chosen": chosen, "rule": "the target whose logits are closer to the adapter "
              f"on the {quantize} base (mean |difference| on the probe batch)",
              "reference_loss": quantized_ref[1], "candidates": figures, "summary": summary}
    return target, notes, chosen_ref
