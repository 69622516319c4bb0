"""`peftkit doctor`: the facts a bug report needs, as plain text to paste.

Versions, devices, whether bitsandbytes' 4-bit kernels run on each device, whether the Hugging
Face Hub answers (one HEAD request, 3 s timeout; never an error), offline settings, the
accelerate config `accelerate launch` would use, and peftkit's cache. Every probe reports its
failure as text instead of raising: the command always exits 0.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from importlib import metadata

from peftkit.cli.common import add_command

LIBRARIES = ("peftkit", "torch", "transformers", "peft", "accelerate", "bitsandbytes",
             "deepspeed", "datasets", "evaluate", "huggingface_hub", "safetensors", "tokenizers")
HUB_TIMEOUT_S = 3.0

HELP = ("versions, devices, bitsandbytes, Hub access, accelerate config: a report to paste "
        "into a bug report")
EXAMPLES = """\
examples:
  peftkit doctor                           # paste the output into a bug report"""


def add_parser(subparsers) -> None:
    add_command(subparsers, "doctor", cmd_doctor, HELP, EXAMPLES)


def cmd_doctor(args) -> int:
    print(report())
    return 0


def _safe(probe) -> list[tuple[str, str]]:
    try:
        return probe()
    except Exception as exc:  # noqa: BLE001 - a probe that breaks is itself a finding
        return [(probe.__name__.removeprefix("_"), f"probe failed: {type(exc).__name__}: {exc}")]


def _versions() -> list[tuple[str, str]]:
    rows = [("python", f"{platform.python_version()} ({sys.executable})"),
            ("platform", platform.platform())]
    for lib in LIBRARIES:
        try:
            rows.append((lib, metadata.version(lib)))
        except metadata.PackageNotFoundError:
            rows.append((lib, "not installed"))
    return rows


def _memory_gib() -> str:
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX
        return "unknown"
    return f"{total / 2**30:.1f} GiB"


def _devices() -> list[tuple[str, str]]:
    import torch

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    rows = [("cpu", f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
             + (f" ({usable} usable by this process)" if usable else "")),
            ("ram", _memory_gib()), ("torch threads", str(torch.get_num_threads()))]
    if torch.cuda.is_available():
        rows.append(("cuda", f"{torch.version.cuda}, {torch.cuda.device_count()} device(s), "
                             f"bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}"))
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            rows.append((f"cuda:{i}", f"{props.name}, {props.total_memory / 2**30:.1f} GiB, "
                                      f"compute capability {props.major}.{props.minor}"))
    else:
        rows.append(("cuda", f"not available (torch built for CUDA {torch.version.cuda})"
                     if torch.version.cuda else "not available (CPU-only torch build)"))
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        rows.append(("mps", "available"))
    return rows


def _bitsandbytes() -> list[tuple[str, str]]:
    """Quantize a small tensor to NF4 and back on each device: the real test of a backend."""
    import logging

    import torch

    # bnb logs about optional kernel packages on import; the probe below says what works.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        import bitsandbytes as bnb
    except Exception as exc:  # noqa: BLE001 - ImportError or a broken native library
        return [("bitsandbytes", f"cannot import ({type(exc).__name__}: {exc}); QLoRA "
                                 "(model.quantize) is unavailable")]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for device in devices:
        try:
            x = torch.randn(64, 64, device=device)
            q, state = bnb.functional.quantize_4bit(x, quant_type="nf4")
            error = (bnb.functional.dequantize_4bit(q, state) - x).abs().mean().item()
            rows.append((f"nf4 on {device}", f"works (mean round-trip error {error:.3f})"))
        except Exception as exc:  # noqa: BLE001
            rows.append((f"nf4 on {device}", f"fails: {type(exc).__name__}: {exc}"))
    return rows


def _hub() -> list[tuple[str, str]]:
    import urllib.error
    import urllib.request

    from huggingface_hub import constants

    offline = os.environ.get("HF_HUB_OFFLINE", "")
    rows = [("endpoint", constants.ENDPOINT),
            ("HF_HUB_OFFLINE", f"{offline or 'unset'} (huggingface_hub sees "
                               f"{'offline' if constants.HF_HUB_OFFLINE else 'online'})"),
            ("hub cache", constants.HF_HUB_CACHE)]
    began = time.perf_counter()
    try:
        request = urllib.request.Request(constants.ENDPOINT, method="HEAD")
        with urllib.request.urlopen(request, timeout=HUB_TIMEOUT_S) as response:
            status = f"reachable (HTTP {response.status}"
    except urllib.error.HTTPError as exc:  # an answer, even an error, means it is reachable
        status = f"reachable (HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        status = f"unreachable ({type(reason).__name__}: {reason}"
    rows.append(("hub", f"{status}, {time.perf_counter() - began:.2f} s)"))
    return rows


def _accelerate() -> list[tuple[str, str]]:
    from accelerate.commands.config import default_config_file

    path = os.environ.get("ACCELERATE_CONFIG_FILE") or default_config_file
    if not os.path.isfile(path):
        return [("config", f"{path} (absent: `accelerate launch` uses its defaults; "
                           "`accelerate config` writes one)")]
    import yaml

    with open(path) as f:
        config = yaml.safe_load(f) or {}
    keys = ("distributed_type", "num_processes", "num_machines", "mixed_precision",
            "use_cpu", "gpu_ids")
    shown = ", ".join(f"{k}={config[k]}" for k in keys if k in config)
    return [("config", f"{path} (in use by `accelerate launch`)"), ("settings", shown or "-")]


def _peftkit() -> list[tuple[str, str]]:
    from peftkit.model.tiny import cache_root

    root = cache_root()
    tiny = sorted(p.name for p in (root / "tiny").glob("*") if p.is_dir()) \
        if (root / "tiny").is_dir() else []
    source = "PEFTKIT_CACHE" if os.environ.get("PEFTKIT_CACHE") else \
        "default; PEFTKIT_CACHE moves it"
    return [("cache", f"{root} ({source})"), ("tiny models built", str(len(tiny)))]


SECTIONS = {"versions": _versions, "devices": _devices, "bitsandbytes": _bitsandbytes,
            "hugging face hub": _hub, "accelerate": _accelerate, "peftkit": _peftkit}


def report() -> str:
    """The whole report as text."""
    lines = ["peftkit doctor — paste this into a bug report", ""]
    for title, probe in SECTIONS.items():
        lines.append(f"## {title}")
        lines += [f"- {key}: {value}" for key, value in _safe(probe)]
        lines.append("")
    return "\n".join(lines)
