"""LoRA r16 on Mistral-7B-Instruct-v0.3 with alpaca-cleaned; one 40-80 GB GPU in bf16."""

from peftkit.recipe import Data, Launch, Lora, Model, Recipe, Train

# Mistral's mistral-finetune defaults: rank 64 on all linear layers, lr 6e-5..1e-4; the
# widely used community setting r=16, alpha=32, lr 2e-4 converges faster on alpaca-sized data.
RECIPE = Recipe(
    model=Model("mistralai/Mistral-7B-Instruct-v0.3", arch="mistral", dtype="bfloat16"),
    adapter=Lora(r=16, alpha=32, dropout=0.05, targets="all-linear"),
    data=Data("yahma/alpaca-cleaned", format="alpaca", max_len=2048),
    train=Train(lr=2e-4, batch_size=4, grad_accum=8, epochs=1, warmup_steps=100,
                gradient_checkpointing=True, eval_every=200, save_every=200),
    launch=Launch(mixed_precision="bf16", hardware="1x 40-80 GB GPU"),
)
