"""LoRA r16 on Llama-3.1-8B-Instruct with alpaca-cleaned; one 40-80 GB GPU in bf16."""

from peftkit.recipe import Data, Launch, Lora, Model, Recipe, Train

# Hyper-parameters follow the common published LoRA settings for Llama 3 8B
# (torchtune llama3_1/8B_lora_single_device: r=8..16, alpha=2r, lr 3e-4, all linear layers).
RECIPE = Recipe(
    model=Model("meta-llama/Llama-3.1-8B-Instruct", arch="llama", dtype="bfloat16"),
    adapter=Lora(r=16, alpha=32, dropout=0.05, targets="all-linear"),
    data=Data("yahma/alpaca-cleaned", format="alpaca", max_len=2048),
    train=Train(lr=3e-4, batch_size=4, grad_accum=8, epochs=1, warmup_steps=100,
                gradient_checkpointing=True, eval_every=200, save_every=200),
    launch=Launch(mixed_precision="bf16", hardware="1x 40-80 GB GPU"),
)
