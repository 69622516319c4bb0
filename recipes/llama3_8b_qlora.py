"""QLoRA r16 on Llama-3.1-8B-Instruct with alpaca-cleaned; fits one 24 GB GPU."""

from peftkit.recipe import Data, Launch, Lora, Model, Recipe, Train

# The QLoRA paper's setup (Dettmers et al. 2023): a frozen NF4 base with double quantization,
# bf16 compute, LoRA on every linear layer, lr 2e-4; gradient checkpointing and a micro-batch
# of 2 x 8 accumulation keep a 2048-token step on one 24 GB GPU (`peftkit show` estimates it).
RECIPE = Recipe(
    model=Model("meta-llama/Llama-3.1-8B-Instruct", arch="llama", dtype="bfloat16",
                quantize="nf4", double_quant=True, compute_dtype="bfloat16"),
    adapter=Lora(r=16, alpha=32, dropout=0.05, targets="all-linear"),
    data=Data("yahma/alpaca-cleaned", format="alpaca", max_len=2048),
    train=Train(lr=2e-4, batch_size=2, grad_accum=8, epochs=1, warmup_steps=100,
                gradient_checkpointing=True, eval_every=200, save_every=200),
    launch=Launch(mixed_precision="bf16", hardware="1x 24 GB GPU"),
)
