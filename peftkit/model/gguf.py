"""Convert a GGUF file, once, into a plain transformers checkpoint in peftkit's cache.

transformers reads GGUF files (llama.cpp's format) for the architectures it lists, by
dequantizing every tensor to float. peftkit does that once per file and saves the result as an
ordinary model directory (config, safetensors, tokenizer with its chat template), keyed by the
file's sha256: training, merging and plain `from_pretrained` then load it like any checkpoint.
The weights are the GGUF's quantized values dequantized, not the original 16-bit weights.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from importlib import metadata
from pathlib import Path

from peftkit.errors import UserError
from peftkit.model.sharded import name_cpu_for_deepspeed, quiet_progress
from peftkit.model.tiny import cache_root

CONVERSION_VERSION = 1  # bump when the way files are converted changes
INFO_FILE = "peftkit_gguf.json"
DTYPE = "float32"  # dequantized GGUF values are not exact in 16 bits


def sha256_of(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def target_dir(sha256: str) -> Path:
    return cache_root() / "gguf" / f"{sha256[:16]}-v{CONVERSION_VERSION}"


def info(directory: str | Path) -> dict | None:
    """What a conversion directory was made from (its peftkit_gguf.json), or None."""
    file = Path(directory) / INFO_FILE
    return json.loads(file.read_text()) if file.is_file() else None


def read_header(file: Path, what: str) -> dict:
    """The GGUF's architecture and quantization type; UserError if it is not a GGUF file."""
    try:
        import gguf
    except ImportError:
        raise UserError(f"{what}: reading GGUF files needs the gguf package; "
                        "pip install gguf") from None
    try:
        reader = gguf.GGUFReader(file)
        arch = str(reader.fields["general.architecture"].contents())
        kind = reader.fields.get("general.file_type")
        kind = gguf.LlamaFileType(int(kind.contents())).name if kind else "unknown"
    # A damaged file fails wherever gguf's parser (numpy views over the bytes) trips: report
    # any such failure as the file's fault, in one line.
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"{what}: {file} is not a readable GGUF file ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    return {"architecture": arch, "gguf_type": kind.removeprefix("MOSTLY_")}


def convert(file: Path, what: str) -> tuple[Path, bool]:
    """(directory of the converted checkpoint, whether it was converted just now)."""
    sha = sha256_of(file)
    target = target_dir(sha)
    if (target / INFO_FILE).is_file():
        return target, False
    header = read_header(file, what)  # before anything is written
    started = time.perf_counter()
    name_cpu_for_deepspeed()  # transformers' save imports DeepSpeed, which guesses loudly
    with quiet_progress():  # the note says what happens; bars over 272 tensors add nothing
        model, tokenizer = _load(file, header, what)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Convert under a temporary name and rename: a crash or a concurrent converter (DDP
    # ranks) never leaves or sees half a conversion; the loser of a race discards its copy.
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".converting-"))
    try:
        with quiet_progress():
            _save_plain(model, tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / INFO_FILE).write_text(json.dumps({
            "sha256": sha, "bytes": file.stat().st_size, **header, "dtype": DTYPE,
            "converted_with": {lib: metadata.version(lib) for lib in ("transformers", "gguf")},
            "seconds": round(time.perf_counter() - started, 1)}, indent=2))
        try:
            tmp.rename(target)
        except OSError:
            if not (target / INFO_FILE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target, True


def _load(file: Path, header: dict, what: str):
    """The GGUF's model, dequantized to float32, and its tokenizer, read by transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = dict(pretrained_model_name_or_path=str(file.parent), gguf_file=file.name)
    try:
        model = AutoModelForCausalLM.from_pretrained(**where, dtype=getattr(torch, DTYPE))
        tokenizer = AutoTokenizer.from_pretrained(**where)
    except ValueError as exc:  # an architecture transformers cannot read from GGUF
        raise UserError(f"{what}: transformers cannot load GGUF architecture "
                        f"{header['architecture']!r} as a causal LM "
                        f"({str(exc).splitlines()[0]}); {_supported()}") from None
    return model, tokenizer


def _supported() -> str:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    archs = [a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer")]
    return "it reads " + ", ".join(archs)


def _save_plain(gguf_model, out: Path) -> None:
    """Save as an ordinary checkpoint. transformers refuses to save a GGUF-loaded model (its
    config carries the GGUF quantization marker), so the same weights go into a fresh
    instance of the class built from the config without it; on the meta device, so the
    tensors are shared, not copied."""
    import torch

    config = gguf_model.config.__class__.from_dict(
        {k: v for k, v in gguf_model.config.to_dict().items() if k != "quantization_config"})
    with torch.device("meta"):
        plain = type(gguf_model)(config)
    plain.load_state_dict(gguf_model.state_dict(), assign=True)
    plain.tie_weights()
    plain.generation_config = gguf_model.generation_config
    plain.save_pretrained(out)
