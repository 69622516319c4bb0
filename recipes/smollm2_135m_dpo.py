"""DPO on the real SmolLM2-135M-Instruct: prefer the city name only to its own full sentences."""

from peftkit.recipe import Data, Launch, Lora, Model, Recipe, Train

# Instruction following by preference, on 2 CPU cores in a few minutes. The pairs are built
# offline from the model itself (scripts/make_capitals_data.py --pairs, docs/preference.md):
# the prompt is "What is the capital of X?" under the system prompt below, `chosen` is the
# city name only, `rejected` is the base's own greedy answer ("The capital of Japan is
# Tokyo."), so the rejected side is on-policy and the rule that ranks the two is the
# instruction. Held-out pairs are the SFT demo's 30 held-out countries (none in train).
# A new adapter on the base; the reference is the base with the adapter disabled.
# Measured (docs/preference.md): 8 steps, ~150 CPU-seconds; held-out preference accuracy 13%
# (ties at step 0) -> 100%, and 27 of 30 held-out answers become a bare name, but only 3 the
# right one (exact match 0% -> 10%): DPO alone teaches the format and loses facts. Lower lr was
# worse; lr 1e-3 with beta 0.1 collapsed. smollm2_135m_orpo.py, ORPO on the same pairs, keeps
# the facts (43.3% exact match); model.adapter_init=runs/demo starts DPO from SFT.
RECIPE = Recipe(
    model=Model("HuggingFaceTB/SmolLM2-135M-Instruct", arch="llama"),
    adapter=Lora(r=16, alpha=32, dropout=0.0, targets="all-linear"),
    data=Data("peftkit:data/capitals_pairs/train.jsonl",
              eval="peftkit:data/capitals_pairs/test.jsonl", max_len=64, packing=False,
              system_prompt="Answer with the city name only."),
    train=Train(objective="dpo", beta=0.5, lr=5e-4, batch_size=8, max_steps=8,
                warmup_steps=1, scheduler="cosine", log_every=2, max_new_tokens=12, seed=0),
    launch=Launch(hardware="CPU, 2 cores"),
)
