"""Adapter methods: the recipe's `adapter` section as a peft config, and the few steps around
training that depend on the method.

    method=lora           peft LoraConfig (modeling.lora_config): DoRA, rsLoRA, per-module
                          rank/alpha patterns, initialisations (gaussian, PiSSA, OLoRA, LoftQ),
                          LoRA+ learning rates (peft's create_loraplus_optimizer)
    method=ia3            peft IA3Config on `targets`
    method=prompt_tuning  peft PromptTuningConfig with `num_virtual_tokens`

PiSSA and OLoRA start from a decomposition of the base weights and rewrite those weights
(W -> W - BA), so an adapter saved as trained fits only the rewritten base. peft converts it
into a plain LoRA of rank 2r that fits the original base; `save_adapter` does that from the
starting weights kept by `initialise`. LoftQ (on a 4-bit base) changes only the LoRA weights
(peft's replace_lora_weights_loftq), so its adapter fits the quantized base as loaded.
"""

from __future__ import annotations

import os
import re
import tempfile
from typing import TYPE_CHECKING

from peftkit.errors import UserError

if TYPE_CHECKING:
    from peftkit.recipe.schema import Lora, Model

INIT_FORMS = r"default|gaussian|pissa|pissa_niter_[1-9]\d*|olora|loftq"
# Settings that mean something for method=lora only, with their defaults.
LORA_ONLY = {"use_dora": False, "use_rslora": False, "init": "default", "bias": "none",
             "loraplus_lr_ratio": 0.0, "rank_pattern": "", "alpha_pattern": ""}


def rewrites_base(init: str) -> bool:
    """PiSSA and OLoRA move the adapter's start point out of the base weights."""
    return init.startswith("pissa") or init == "olora"


def names(text: str) -> list[str] | None:
    """A comma-separated list of module names (None when empty)."""
    return [n.strip() for n in text.split(",") if n.strip()] or None


def target_modules(text: str) -> str | list[str]:
    """'all-linear' and regexes go to peft as a string, comma-separated names as a list."""
    text = text.strip()
    if text == "all-linear" or re.search(r"[\\^$.*+?()\[\]|]", text):
        return text
    return names(text) or []


def parse_pattern(text: str, kind: type) -> dict:
    """'q_proj=8,v_proj=32' -> {'q_proj': 8, 'v_proj': 32} (values of type `kind`, > 0).
    Raises ValueError naming the bad pair."""
    pattern = {}
    for pair in (p.strip() for p in text.split(",")):
        if not pair:
            continue
        key, sep, value = pair.rpartition("=")
        try:
            number = kind(value) if sep and key.strip() else None
        except ValueError:
            number = None
        if number is None or number <= 0:
            raise ValueError(f"{pair!r} is not name={kind.__name__} with a value > 0")
        pattern[key.strip()] = number
    return pattern


def init_lora_weights(init: str) -> bool | str:
    """peft's `init_lora_weights` for adapter.init. LoftQ starts from the default init and is
    applied after the layers exist (see `initialise`)."""
    return True if init in ("default", "loftq") else init


def adapter_problems(m: Model, a: Lora) -> list[str]:
    """Adapter settings that cannot work together, each naming its field."""
    problems = []
    if a.method != "lora":
        problems += [f"adapter.{key}={getattr(a, key)!r}: applies to method=lora only "
                     f"(adapter.method={a.method})"
                     for key, default in LORA_ONLY.items() if getattr(a, key) != default]
    if not re.fullmatch(INIT_FORMS, a.init):
        problems.append(f"adapter.init={a.init!r}: must be one of default, gaussian, pissa, "
                        "pissa_niter_N (e.g. pissa_niter_16), olora, loftq")
    if a.init == "loftq" and m.quantize != "nf4":
        problems.append("adapter.init='loftq': fits LoRA to the error of 4-bit NF4 "
                        f"quantization; needs model.quantize=nf4 (it is {m.quantize})")
    for key, kind in (("rank_pattern", int), ("alpha_pattern", float)):
        try:
            parse_pattern(getattr(a, key), kind)
        except ValueError as exc:
            problems.append(f"adapter.{key}={getattr(a, key)!r}: {exc}; expected "
                            f"comma-separated name={kind.__name__} pairs (q_proj=8,v_proj=32)")
    if rewrites_base(a.init) and a.use_rslora and (a.rank_pattern or a.alpha_pattern):
        problems.append(f"adapter.init={a.init!r} with use_rslora and rank/alpha patterns: peft "
                        "cannot convert such an adapter to fit the original base; drop one")
    if a.loraplus_lr_ratio < 0:
        problems.append(f"adapter.loraplus_lr_ratio={a.loraplus_lr_ratio!r}: must be >= 0 "
                        "(0 = off)")
    if a.num_virtual_tokens <= 0:
        problems.append(f"adapter.num_virtual_tokens={a.num_virtual_tokens!r}: must be > 0")
    return problems


def non_lora_config(adapter: Lora, model_type: str):
    """The peft config of method=ia3 or prompt_tuning."""
    modules_to_save = names(adapter.modules_to_save)
    if adapter.method == "prompt_tuning":
        from peft import PromptTuningConfig

        return PromptTuningConfig(task_type="CAUSAL_LM", modules_to_save=modules_to_save,
                                  num_virtual_tokens=adapter.num_virtual_tokens)
    from peft import IA3Config
    from peft.utils import TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FEEDFORWARD

    targets = target_modules(adapter.targets)
    # IA3 scales the input of feed-forward layers and the output of the others; peft knows
    # which layers are feed-forward per architecture (it requires them among the targets).
    feedforward = FEEDFORWARD.get(model_type, [])
    if isinstance(targets, list):
        feedforward = [name for name in feedforward if name in targets]
    return IA3Config(task_type="CAUSAL_LM", target_modules=targets,
                     feedforward_modules=feedforward, modules_to_save=modules_to_save)


def describe(adapter: Lora) -> str:
    """A short name of the method, e.g. 'DoRA r16', 'IA3', 'prompt tuning (20 tokens)'."""
    if adapter.method == "ia3":
        return "IA3"
    if adapter.method == "prompt_tuning":
        return f"prompt tuning ({adapter.num_virtual_tokens} tokens)"
    name = "DoRA" if adapter.use_dora else "LoRA"
    extras = [x for x in ("rsLoRA" if adapter.use_rslora else "",
                          "LoRA+" if adapter.loraplus_lr_ratio else "",
                          "" if adapter.init == "default" else adapter.init) if x]
    return f"{name} r{adapter.r}" + (f" ({', '.join(extras)})" if extras else "")


def initialise(peft_model, adapter: Lora) -> dict | None:
    """Method-specific steps after peft created the adapter layers. Returns the adapter's
    starting weights when saving needs them (PiSSA, OLoRA), else None."""
    if adapter.init == "loftq":
        _apply_loftq(peft_model)
    if adapter.method == "ia3":
        _name_feedforward_as_targets(peft_model.peft_config["default"])
    if not rewrites_base(adapter.init):
        return None
    return {k: v.detach().clone() for k, v in peft_model.state_dict().items() if "lora_" in k}


def _name_feedforward_as_targets(config) -> None:
    """peft expands targets='all-linear' into full module paths but keeps feedforward_modules
    as short names, and then refuses to load its own saved config (feed-forward modules must
    be a subset of the targets): name the feed-forward layers by the same full paths."""
    targets, feedforward = config.target_modules, config.feedforward_modules
    if isinstance(targets, set) and isinstance(feedforward, set) and not feedforward <= targets:
        config.feedforward_modules = {t for t in targets
                                      if any(t == f or t.endswith("." + f) for f in feedforward)}


def _apply_loftq(peft_model) -> None:
    import torch
    from peft import replace_lora_weights_loftq

    if not torch.cuda.is_available():
        raise UserError("adapter.init=loftq: peft computes LoftQ on a CUDA GPU and none is "
                        "available; use adapter.init=default or gaussian on this machine")
    source = peft_model.get_base_model().config._name_or_path
    try:  # a local model directory names its safetensors; a Hub id is found in the HF cache
        replace_lora_weights_loftq(peft_model, model_path=source if os.path.isdir(source)
                                   else None)
    except (ValueError, FileNotFoundError) as exc:
        raise UserError(f"adapter.init=loftq: {exc}") from exc


def make_optimizer(peft_model, params: list, adapter: Lora, lr: float, weight_decay: float):
    """AdamW on the adapter parameters; with LoRA+, B matrices get lr x loraplus_lr_ratio."""
    import torch

    if not adapter.loraplus_lr_ratio:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    from peft.optimizers import create_loraplus_optimizer

    return create_loraplus_optimizer(peft_model, torch.optim.AdamW, lr=lr,
                                     loraplus_lr_ratio=adapter.loraplus_lr_ratio,
                                     loraplus_weight_decay=weight_decay)


def save_adapter(peft_model, out, state_dict: dict | None, initial: dict | None) -> None:
    """Save the adapter in PEFT format; a PiSSA/OLoRA adapter is first converted by peft into
    a plain LoRA (rank 2r) that fits the original, unmodified base weights."""
    if initial is None:
        peft_model.save_pretrained(out, state_dict=state_dict)
        return
    config = peft_model.peft_config["default"]
    with tempfile.TemporaryDirectory(prefix="peftkit-init-") as start:
        init, config.init_lora_weights = config.init_lora_weights, True
        try:  # peft's recipe: the start point is saved as a plain LoRA, then subtracted
            peft_model.save_pretrained(start, state_dict=initial)
        finally:
            config.init_lora_weights = init
        peft_model.save_pretrained(out, state_dict=state_dict,
                                   path_initial_model_for_weight_conversion=start)
