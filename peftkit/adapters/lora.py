"""method=lora: peft's LoraConfig with DoRA, rsLoRA, per-module rank/alpha patterns,
initialisations (gaussian, PiSSA, OLoRA, LoftQ) and LoRA+ learning rates (peft's
create_loraplus_optimizer).

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

from peftkit.adapters.method import AdapterMethod, module_names, target_modules
from peftkit.errors import UserError

INIT_FORMS = r"default|gaussian|pissa|pissa_niter_[1-9]\d*|olora|loftq"
# Settings that mean something for method=lora only, with their defaults.
LORA_ONLY = {"use_dora": False, "use_rslora": False, "init": "default", "bias": "none",
             "loraplus_lr_ratio": 0.0, "rank_pattern": "", "alpha_pattern": ""}


def rewrites_base(init: str) -> bool:
    """PiSSA and OLoRA move the adapter's start point out of the base weights."""
    return init.startswith("pissa") or init == "olora"


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


def lora_config(adapter):
    """peft's LoraConfig for the recipe's adapter section."""
    from peft import LoraConfig

    return LoraConfig(
        r=adapter.r, lora_alpha=adapter.alpha, lora_dropout=adapter.dropout,
        target_modules=target_modules(adapter.targets), use_rslora=adapter.use_rslora,
        use_dora=adapter.use_dora, init_lora_weights=init_lora_weights(adapter.init),
        bias=adapter.bias, task_type="CAUSAL_LM",
        rank_pattern=parse_pattern(adapter.rank_pattern, int),
        alpha_pattern=parse_pattern(adapter.alpha_pattern, float),
        modules_to_save=module_names(adapter.modules_to_save),
    )


class LoraMethod(AdapterMethod):
    name = "lora"
    label = "LoRA"

    def peft_config(self, adapter, model_type: str):
        return lora_config(adapter)

    def setting_problems(self, model, adapter) -> list[str]:
        """LoRA's settings: refused under another method, and checked for combinations that
        cannot work (a quantized base cannot hold rewritten weights, LoftQ needs NF4, ...)."""
        problems = []
        if model.quantize and rewrites_base(adapter.init):
            problems.append(f"adapter.init={adapter.init!r}: rewrites the base weights, which a "
                            f"quantized base (model.quantize={model.quantize}) cannot hold "
                            "exactly; use default, gaussian or loftq (nf4), or drop "
                            "model.quantize")
        if adapter.method != self.name:
            problems += [f"adapter.{key}={getattr(adapter, key)!r}: applies to method=lora only "
                         f"(adapter.method={adapter.method})"
                         for key, default in LORA_ONLY.items() if getattr(adapter, key) != default]
        if not re.fullmatch(INIT_FORMS, adapter.init):
            problems.append(f"adapter.init={adapter.init!r}: must be one of default, gaussian, "
                            "pissa, pissa_niter_N (e.g. pissa_niter_16), olora, loftq")
        if adapter.init == "loftq" and model.quantize != "nf4":
            problems.append("adapter.init='loftq': fits LoRA to the error of 4-bit NF4 "
                            f"quantization; needs model.quantize=nf4 (it is {model.quantize})")
        for key, kind in (("rank_pattern", int), ("alpha_pattern", float)):
            try:
                parse_pattern(getattr(adapter, key), kind)
            except ValueError as exc:
                problems.append(f"adapter.{key}={getattr(adapter, key)!r}: {exc}; expected "
                                f"comma-separated name={kind.__name__} pairs "
                                "(q_proj=8,v_proj=32)")
        if rewrites_base(adapter.init) and adapter.use_rslora and (adapter.rank_pattern
                                                                   or adapter.alpha_pattern):
            problems.append(f"adapter.init={adapter.init!r} with use_rslora and rank/alpha "
                            "patterns: peft cannot convert such an adapter to fit the original "
                            "base; drop one")
        if adapter.loraplus_lr_ratio < 0:
            problems.append(f"adapter.loraplus_lr_ratio={adapter.loraplus_lr_ratio!r}: must be "
                            ">= 0 (0 = off)")
        return problems

    def describe(self, adapter) -> str:
        """'LoRA r16', 'DoRA r8 (rsLoRA, LoRA+, pissa)', ..."""
        name = "DoRA" if adapter.use_dora else "LoRA"
        extras = [x for x in ("rsLoRA" if adapter.use_rslora else "",
                              "LoRA+" if adapter.loraplus_lr_ratio else "",
                              "" if adapter.init == "default" else adapter.init) if x]
        return f"{name} r{adapter.r}" + (f" ({', '.join(extras)})" if extras else "")

    def card_summary(self, adapter) -> str:
        return (f"A LoRA adapter (r={adapter.r}, alpha={adapter.alpha:g}, "
                f"targets `{adapter.targets}`)")

    def reads_base_at_start(self, adapter) -> bool:
        """PiSSA, OLoRA and LoftQ decompose the base weights; DoRA starts from their norms."""
        return rewrites_base(adapter.init) or adapter.init == "loftq" or adapter.use_dora

    def initialise(self, peft_model, adapter) -> dict | None:
        """LoftQ fits the LoRA weights now; PiSSA and OLoRA return their starting weights."""
        if adapter.init == "loftq":
            _apply_loftq(peft_model)
        if not rewrites_base(adapter.init):
            return None
        return {k: v.detach().clone() for k, v in peft_model.state_dict().items()
                if "lora_" in k}

    def make_optimizer(self, peft_model, params: list, adapter, lr: float, weight_decay: float):
        """AdamW on the adapter parameters; with LoRA+, B matrices get lr x loraplus_lr_ratio."""
        if not adapter.loraplus_lr_ratio:
            return super().make_optimizer(peft_model, params, adapter, lr, weight_decay)
        import torch
        from peft.optimizers import create_loraplus_optimizer

        return create_loraplus_optimizer(peft_model, torch.optim.AdamW, lr=lr,
                                         loraplus_lr_ratio=adapter.loraplus_lr_ratio,
                                         loraplus_weight_decay=weight_decay)

    def save_adapter(self, peft_model, out, state_dict: dict | None,
                     initial: dict | None) -> None:
        """Save the adapter in PEFT format; a PiSSA/OLoRA adapter is first converted by peft
        into a plain LoRA (rank 2r) that fits the original, unmodified base weights."""
        if initial is None:
            super().save_adapter(peft_model, out, state_dict, initial)
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

    def layers_saving_activations(self, peft_model) -> list:
        """LoRA layers of the first decoder layer (every layer of these models is alike): each
        keeps A's output (r values per token) and, with dropout, its dropped input."""
        from peft.tuners.lora import LoraLayer

        return [mod for name, mod in peft_model.named_modules()
                if isinstance(mod, LoraLayer) and ".layers.0." in name]


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


LORA = LoraMethod()
