"""Demo preference tuning: DPO on sort/reverse pairs (right answer vs a one-swap near miss)."""

from peftkit.recipe import Data, Launch, Lora, Model, Recipe, Train

# The pairs are built offline by scripts/make_preference_data.py from the demo task: `chosen`
# is the right answer, `rejected` the same answer with one adjacent swap (docs/preference.md).
# SFT first (tiny-demo: the same tiny Llama and adapter), then DPO on that adapter, the SFT
# policy as reference:
#   peftkit train tiny-demo; peftkit train demo-dpo model.adapter_init=runs/tiny-demo
# Without model.adapter_init, DPO starts a new adapter on the base (reference: the base).
RECIPE = Recipe(
    model=Model("peftkit/tiny-llama-demo", arch="llama", tiny=True, tiny_size="s"),
    adapter=Lora(r=16, alpha=32, dropout=0.0, targets="all-linear",
                 modules_to_save="embed_tokens,lm_head"),
    data=Data("peftkit:data/sort_reverse_pairs/train.jsonl",
              eval="peftkit:data/sort_reverse_pairs/test.jsonl", max_len=64, packing=False),
    train=Train(objective="dpo", beta=0.1, lr=2e-4, batch_size=16, max_steps=100,
                warmup_steps=10, scheduler="cosine", log_every=10, eval_every=50, seed=0),
    launch=Launch(hardware="CPU, 2 cores"),
)
