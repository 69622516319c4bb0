"""Tiny demo: teach a tiny random-weight Llama to sort digits and reverse letters (CPU, ~1 min).

The fast stand-in the tests, benchmarks and docs' transcripts use; `demo` is the real-model one."""

from peftkit.recipe import Data, Launch, Lora, Model, Recipe, Train

# The base is a random-weight Llama (hidden 256, 4 layers) built offline with peftkit's own
# byte-level BPE tokenizer. A random LM head gives a near-flat softmax, so the head and the
# embeddings are trained in full (peft modules_to_save) next to the LoRA matrices.
RECIPE = Recipe(
    model=Model("peftkit/tiny-llama-demo", arch="llama", tiny=True, tiny_size="s"),
    adapter=Lora(r=16, alpha=32, dropout=0.0, targets="all-linear",
                 modules_to_save="embed_tokens,lm_head"),
    data=Data("peftkit:data/sort_reverse/train.jsonl", eval="peftkit:data/sort_reverse/test.jsonl",
              format="chat", max_len=64),
    train=Train(lr=1e-3, batch_size=32, max_steps=300, warmup_steps=20, scheduler="cosine",
                log_every=10, eval_every=100, save_every=100, eval_generate=100,
                max_new_tokens=12, seed=0),
    launch=Launch(hardware="CPU, 2 cores"),
)
