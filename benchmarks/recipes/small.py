"""Benchmark: small Llama (58M params, 32k vocab), LoRA r16 all-linear, long-tailed lengths."""

from peftkit.bench.data import dataset_file
from peftkit.recipe import Data, Launch, Lora, Model, Recipe, Train

# Random weights, built offline (hidden 512, 8 layers, 42M matmul parameters with the LM
# head); a 32k vocabulary makes the head and cross-entropy weigh what they do in real models.
# LoRA dropout 0 (as torchtune's LoRA configs; the Trainer baseline gets the same adapter)
# and compiled decoder layers (train.compile; the first, untimed step pays the compile).
RECIPE = Recipe(
    model=Model("peftkit/bench-llama-m", arch="llama", tiny=True, tiny_size="m"),
    adapter=Lora(r=16, alpha=32, dropout=0.0, targets="all-linear"),
    data=Data(dataset_file("varlen", 4096), format="prompt_completion", max_len=1024,
              eval_size=0),
    train=Train(lr=2e-4, batch_size=8, max_steps=16, warmup_steps=0, seed=0, compile=True),
    launch=Launch(hardware="CPU or one GPU"),
)
