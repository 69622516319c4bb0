"""method=ia3: peft's IA3Config, learned rescaling vectors on `targets`."""

from __future__ import annotations

from peftkit.adapters.method import AdapterMethod, module_names, target_modules


class IA3Method(AdapterMethod):
    name = "ia3"
    label = "IA3"

    def peft_config(self, adapter, model_type: str):
        from peft import IA3Config
        from peft.utils import \
            TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FEEDFORWARD

        targets = target_modules(adapter.targets)
        # IA3 scales the input of feed-forward layers and the output of the others; peft knows
        # which layers are feed-forward per architecture (it requires them among the targets).
        feedforward = FEEDFORWARD.get(model_type, [])
        if isinstance(targets, list):
            feedforward = [name for name in feedforward if name in targets]
        return IA3Config(task_type="CAUSAL_LM", target_modules=targets,
                         feedforward_modules=feedforward,
                         modules_to_save=module_names(adapter.modules_to_save))

    def initialise(self, peft_model, adapter) -> dict | None:
        _name_feedforward_as_targets(peft_model.peft_config["default"])
        return None


def _name_feedforward_as_targets(config) -> None:
    """peft expands targets='all-linear' into full module paths but keeps feedforward_modules
    as short names, and then refuses to load its own saved config (feed-forward modules must
    be a subset of the targets): name the feed-forward layers by the same full paths."""
    targets, feedforward = config.target_modules, config.feedforward_modules
    if isinstance(targets, set) and isinstance(feedforward, set) and not feedforward <= targets:
        config.feedforward_modules = {t for t in targets
                                      if any(t == f or t.endswith("." + f) for f in feedforward)}


IA3 = IA3Method()
