"""QLoRA (NF4) r16 on the real SmolLM2-135M-Instruct, offline from a packaged GGUF; 2 CPU cores."""

from peftkit.recipe import Data, Launch, Lora, Model, Recipe, Train

# The LoRA recipe's run (smollm2_135m_lora.py) on a 4-bit NF4 base with double quantization:
# QLoRA end to end on a real model without a GPU. On CPU the 4-bit layers compute in float32;
# the base is the dequantized GGUF quantized again to NF4 (docs/real-models.md).
RECIPE = Recipe(
    model=Model("HuggingFaceTB/SmolLM2-135M-Instruct", arch="llama", quantize="nf4",
                double_quant=True),
    adapter=Lora(r=16, alpha=32, dropout=0.0, targets="all-linear"),
    data=Data("peftkit:data/sort_reverse/train.jsonl", format="chat", max_len=64,
              max_samples=512, eval_size=32),
    train=Train(lr=1e-3, batch_size=8, max_steps=12, warmup_steps=2, log_every=2,
                eval_generate=16, max_new_tokens=12, seed=0),
    launch=Launch(hardware="CPU, 2 cores"),
)
