"""model.adapter_init: start a run from an existing adapter (a run directory or an adapter
folder), e.g. DPO on top of an SFT run. The recipe's adapter settings build the adapter; the
saved weights then replace its initial ones, so the two must describe the same adapter."""

from __future__ import annotations

from pathlib import Path

from peftkit.errors import UserError
from peftkit.run.rundir import RunDir

WEIGHTS = "adapter_model.safetensors"
# Names of adapter (not base) tensors in a PeftModel's state dict.
ADAPTER_PARTS = ("lora_", "modules_to_save", "ia3_", "prompt_encoder")


def adapter_folder(source: str) -> Path:
    """The adapter folder `source` names (a run directory or the folder itself); checked
    before anything loads."""
    path = Path(source).expanduser()
    for folder in (RunDir(path).adapter, path):
        if (folder / WEIGHTS).is_file():
            return folder
    raise UserError(f"model.adapter_init={source!r}: no trained adapter there (expected "
                    f"{RunDir(path).adapter / WEIGHTS} or {path / WEIGHTS}); point it at a "
                    "finished run directory or an adapter folder")


def load_start(peft_model, source: str) -> None:
    """Replace the new adapter's weights with the saved ones; every saved tensor must fit."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    saved = load_file(str(adapter_folder(source) / WEIGHTS))
    try:
        result = set_peft_model_state_dict(peft_model, saved)
    except RuntimeError as exc:  # shape mismatch: another rank or targets
        raise UserError(f"model.adapter_init={source!r}: the saved adapter does not fit this "
                        f"recipe's adapter settings ({str(exc).splitlines()[1].strip()}); use "
                        "the adapter.* settings of the run it comes from") from None
    unused = list(getattr(result, "unexpected_keys", []) or [])
    # Adapter tensors the file leaves at their fresh initialisation (e.g. more targets here).
    fresh = [k for k in getattr(result, "missing_keys", []) or []
             if any(part in k for part in ADAPTER_PARTS)]
    if unused or fresh:
        example = (unused or fresh)[0]
        what = "have no place in" if unused else "are missing for"
        raise UserError(f"model.adapter_init={source!r}: {len(unused or fresh)} adapter tensors "
                        f"{what} this recipe's adapter (e.g. {example}); use the adapter.* "
                        "settings of the run it comes from")
