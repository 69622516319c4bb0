"""Benchmark: the real SmolLM2-135M-Instruct, LoRA r16 all-linear, real conversations."""

from peftkit.bench.data import dataset_file
from peftkit.recipe import Data, Launch, Lora, Model, Recipe, Train

# Real weights (offline: the packaged GGUF, converted once; docs/real-models.md) and real
# text: chitchat-dataset conversations rendered with the model's own chat template, so the
# lengths are what a chat fine-tune meets (median ~450 tokens, a long tail: 28% over 1024, cut
# there: mean ~530), and the loss covers the assistant turns only. Compiled decoder layers.
RECIPE = Recipe(
    model=Model("HuggingFaceTB/SmolLM2-135M-Instruct", arch="llama"),
    adapter=Lora(r=16, alpha=32, dropout=0.0, targets="all-linear"),
    data=Data(dataset_file("chitchat", 2048), format="chat", max_len=1024, eval_size=0),
    train=Train(lr=2e-4, batch_size=8, max_steps=16, warmup_steps=0, seed=0, compile=True),
    launch=Launch(hardware="CPU or one GPU"),
)
