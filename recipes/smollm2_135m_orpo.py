"""ORPO on the real SmolLM2-135M-Instruct: the city name only, keeping the fact."""

from peftkit.recipe import Data, Launch, Lora, Model, Recipe, Train

# The pairs of smollm2_135m_dpo.py (chosen = the city name only, rejected = the base's own
# full-sentence answer; docs/preference.md), with ORPO instead of DPO: no reference, and a
# next-token loss on the chosen answer beside the odds-ratio term. That term keeps the fact
# DPO erodes by pushing down rejected sentences that name the right city. Measured (quiet 2
# cores, 119 CPU-seconds): held-out preference accuracy 0% -> 93%, held-out exact match of
# the generations 43.3% (DPO on the same pairs: 10%; the SFT demo: 33.3%), forgetting +0.1%.
RECIPE = Recipe(
    model=Model("HuggingFaceTB/SmolLM2-135M-Instruct", arch="llama"),
    adapter=Lora(r=16, alpha=32, dropout=0.0, targets="all-linear"),
    data=Data("peftkit:data/capitals_pairs/train.jsonl",
              eval="peftkit:data/capitals_pairs/test.jsonl", max_len=64, packing=False,
              system_prompt="Answer with the city name only."),
    train=Train(objective="orpo", orpo_lambda=0.1, lr=5e-4, batch_size=8, max_steps=8,
                warmup_steps=1, scheduler="cosine", log_every=2, max_new_tokens=12, seed=0),
    launch=Launch(hardware="CPU, 2 cores"),
)
