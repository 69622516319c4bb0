"""LoRA r16 on Qwen2.5-7B-Instruct with alpaca-cleaned; one 40-80 GB GPU in bf16."""

from peftkit.recipe import Data, Launch, Lora, Model, Recipe, Train

# Qwen's own fine-tuning examples use lr 1e-4..2e-4 with r=8..64 on all projections.
RECIPE = Recipe(
    model=Model("Qwen/Qwen2.5-7B-Instruct", arch="qwen2", dtype="bfloat16"),
    adapter=Lora(r=16, alpha=32, dropout=0.05, targets="all-linear"),
    data=Data("yahma/alpaca-cleaned", format="alpaca", max_len=2048),
    train=Train(lr=2e-4, batch_size=4, grad_accum=8, epochs=1, warmup_steps=100,
                gradient_checkpointing=True, eval_every=200, save_every=200),
    launch=Launch(mixed_precision="bf16", hardware="1x 40-80 GB GPU"),
    name="qwen2.5-7b-lora",
)
