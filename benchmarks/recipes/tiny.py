"""Benchmark: tiny Llama (7.6M params, 4k vocab), LoRA r16 all-linear, long-tailed lengths."""

from peftkit.bench.data import dataset_file
from peftkit.recipe import Data, Launch, Lora, Model, Recipe, Train

# Random weights, built offline (hidden 256, 4 layers); synthetic instruction-like data with a
# lognormal length distribution (median ~220 tokens, clipped 16..1024), see bench_data.py.
# LoRA dropout 0 (as torchtune's LoRA configs; the Trainer baseline gets the same adapter)
# and compiled decoder layers (train.compile; the first, untimed step pays the compile).
RECIPE = Recipe(
    model=Model("peftkit/bench-llama-s", arch="llama", tiny=True, tiny_size="s"),
    adapter=Lora(r=16, alpha=32, dropout=0.0, targets="all-linear"),
    data=Data(dataset_file("varlen", 4096), format="prompt_completion", max_len=1024,
              eval_size=0),
    train=Train(lr=2e-4, batch_size=8, max_steps=16, warmup_steps=0, seed=0, compile=True),
    launch=Launch(hardware="CPU or one GPU"),
)
