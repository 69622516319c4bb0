"""method=prompt_tuning: peft's PromptTuningConfig, `num_virtual_tokens` learned input
embeddings prepended to every row."""

from __future__ import annotations

from peftkit.adapters.method import AdapterMethod, module_names


class PromptTuningMethod(AdapterMethod):
    name = "prompt_tuning"
    label = "prompt-tuning"
    packable = False  # the virtual tokens are prepended once per row, not per packed sample
    merge_refusal = ("nothing to merge (it learns input embeddings, not weight changes); "
                     "publish the adapter itself")

    def peft_config(self, adapter, model_type: str):
        from peft import PromptTuningConfig

        return PromptTuningConfig(task_type="CAUSAL_LM",
                                  modules_to_save=module_names(adapter.modules_to_save),
                                  num_virtual_tokens=adapter.num_virtual_tokens)

    def setting_problems(self, model, adapter) -> list[str]:
        if adapter.num_virtual_tokens <= 0:
            return [f"adapter.num_virtual_tokens={adapter.num_virtual_tokens!r}: must be > 0"]
        return []

    def describe(self, adapter) -> str:
        return f"prompt tuning ({adapter.num_virtual_tokens} tokens)"


PROMPT_TUNING = PromptTuningMethod()
