"""QLoRA r16 on Qwen2.5-7B-Instruct with alpaca-cleaned; fits one 24 GB GPU."""

from peftkit.recipe import Data, Launch, Lora, Model, Recipe, Train

# QLoRA settings as for Llama 3 8B (NF4 + double quantization, bf16 compute, all linear
# layers, lr 2e-4). Qwen2.5's 152k vocabulary makes the LM head and its logits larger, so the
# same micro-batch of 2 x 2048 tokens leaves less headroom: check `peftkit show`.
RECIPE = Recipe(
    model=Model("Qwen/Qwen2.5-7B-Instruct", arch="qwen2", dtype="bfloat16",
                quantize="nf4", double_quant=True, compute_dtype="bfloat16"),
    adapter=Lora(r=16, alpha=32, dropout=0.05, targets="all-linear"),
    data=Data("yahma/alpaca-cleaned", format="alpaca", max_len=2048),
    train=Train(lr=2e-4, batch_size=2, grad_accum=8, epochs=1, warmup_steps=100,
                gradient_checkpointing=True, eval_every=200, save_every=200),
    launch=Launch(mixed_precision="bf16", hardware="1x 24 GB GPU"),
    name="qwen2.5-7b-qlora",
)
