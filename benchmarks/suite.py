"""The benchmark suite: which recipes, data, quantization and baselines `run.py` measures.

Two Llama-architecture models with random weights (benchmarks/recipes/tiny.py: 7.6M params,
4k vocab; small.py: 58M params, 32k vocab), each on (a) long-tailed instruction-like lengths
(median ~220 tokens, 16..1024) and (b) fixed 256-token samples, with LoRA and with QLoRA (NF4
base through bitsandbytes). Sized to run in minutes on a 2-core CPU. Then the real
SmolLM2-135M-Instruct on real conversations (benchmarks/recipes/real.py).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from peftkit.bench.data import dataset_file

RECIPES = Path(__file__).resolve().parent / "recipes"


@dataclass(frozen=True)
class Entry:
    label: str
    recipe: str  # file under benchmarks/recipes/ (or relative to it)
    overrides: tuple[str, ...] = ()
    vs: tuple[str, ...] = ("hf", "hf-grouped")
    steps: int = 8
    repeat: int = 1  # runs of every side, alternating: ratios with their spread
    tags: tuple[str, ...] = field(default=())

    @property
    def slug(self) -> str:
        return self.label.replace(" / ", "-").replace(" ", "-").lower()

    @property
    def path(self) -> str:
        return str((RECIPES / self.recipe).resolve())


def fixed() -> tuple[str, ...]:
    return (f"data.train={dataset_file('fixed')}", "data.max_len=256")


def entries() -> list[Entry]:
    return [
        Entry("tiny / varlen / LoRA", "tiny.py", steps=16),
        Entry("tiny / fixed-256 / LoRA", "tiny.py", fixed(), vs=("hf",), steps=16),
        Entry("tiny / varlen / QLoRA-nf4", "tiny.py", ("model.quantize=nf4",), steps=16),
        Entry("small / varlen / LoRA", "small.py", steps=8),
        # The strongest peer, alone (its own row): 3 alternating runs give its ratio a spread;
        # 4 steps (3 timed) keep the 6 runs within minutes on a loaded 2-core machine.
        Entry("small / varlen / LoRA vs TRL", "small.py", vs=("trl",), steps=4, repeat=3),
        Entry("small / fixed-256 / LoRA", "small.py", fixed(), vs=("hf",), steps=8),
        Entry("small / varlen / QLoRA-nf4", "small.py", ("model.quantize=nf4",), steps=8),
        # The real model on real conversations (benchmarks/recipes/real.py), against both
        # peers; 4 steps (3 timed) of ~4,300 tokens each on a 135M model.
        Entry("real / chitchat / LoRA", "real.py", vs=("hf", "trl"), steps=4),
        # DPO against TRL's DPOTrainer: the shipped demo recipe (tiny Llama, sort/reverse
        # pairs, batch 16); 20 steps (19 timed) of ~0.3 s each, 3 alternating runs.
        Entry("demo / DPO vs TRL", "../../recipes/demo_dpo.py", vs=("trl",), steps=20,
              repeat=3),
    ]


def entry(label: str) -> Entry:
    """The suite entry called `label`; exits with the known labels if there is none."""
    found = [e for e in entries() if e.label == label]
    if not found:
        print(f"--entry {label!r}: not a suite entry; use one of: "
              + ", ".join(repr(e.label) for e in entries()), file=sys.stderr)
        raise SystemExit(2)
    return found[0]


def wait_for_quiet(max_load: float, max_wait: float) -> float:
    """Wait (up to `max_wait` s) for the 1-minute load average to fall to `max_load`: the
    machine may be shared. Returns the load when the wait ended."""
    waited = 0.0
    while os.getloadavg()[0] > max_load and waited < max_wait:
        print(f"load {os.getloadavg()[0]:.2f} > {max_load}: waiting", file=sys.stderr, flush=True)
        time.sleep(30)
        waited += 30
    return os.getloadavg()[0]
