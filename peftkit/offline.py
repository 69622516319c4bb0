"""Offline without waiting: when the Hugging Face Hub cannot be reached, say so once and let
huggingface_hub work from its cache, instead of retrying every request.

Unreachable, huggingface_hub retries each lookup with backoff (1+2+4+8+8 s) and prints a line
per retry: ~23 s and a dozen lines of noise before each of peftkit's offline fallbacks (a
model's packaged GGUF copy, the table of published shapes), on every command. `go_offline_if_
unreachable` is called just before the first Hub lookup a command makes: unless the user
chose (HF_HUB_OFFLINE set either way), it opens one TCP connection to the Hub's endpoint
(HF_ENDPOINT) with a short timeout; if that fails it switches huggingface_hub to offline mode
for this process and the processes it starts, and prints one note. The cache and local files
keep working; nothing is downloaded that could have been.
"""

from __future__ import annotations

import os
import socket
import sys
from urllib.parse import urlparse

TIMEOUT_S = 3.0
DEFAULT_ENDPOINT = "https://huggingface.co"

_checked: bool | None = None  # None: not yet; else whether this process went offline


def reachable(endpoint: str, timeout: float = TIMEOUT_S) -> tuple[bool, str]:
    """(whether a TCP connection to `endpoint` opens within `timeout` s, why not)."""
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return True, ""
    except OSError as exc:  # DNS failure, refused, unreachable network, timeout
        return False, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def go_offline_if_unreachable() -> bool:
    """Switch huggingface_hub to offline mode if the Hub cannot be reached (checked once per
    process, never when HF_HUB_OFFLINE is set); returns whether the process is now offline
    by this check."""
    global _checked
    if _checked is not None:
        return _checked
    _checked = False
    if os.environ.get("HF_HUB_OFFLINE", "") != "":
        return False  # the user's choice, either way
    endpoint = os.environ.get("HF_ENDPOINT", "") or DEFAULT_ENDPOINT
    ok, why = reachable(endpoint)
    if ok:
        return False
    os.environ["HF_HUB_OFFLINE"] = "1"  # read at import, and by the processes started later
    if "huggingface_hub" in sys.modules:  # already imported: its constant, read per request
        from huggingface_hub import constants

        constants.HF_HUB_OFFLINE = True
    if "datasets" in sys.modules:  # datasets keeps a copy of its own
        import datasets

        datasets.config.HF_HUB_OFFLINE = True
    print(f"note: the Hugging Face Hub ({endpoint}) is unreachable ({why}); working offline "
          "from the HF cache and local files (set HF_HUB_OFFLINE=1 to skip this check)",
          file=sys.stderr, flush=True)
    _checked = True
    return True
