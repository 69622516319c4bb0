"""Demo: SmolLM2-135M-Instruct learns to answer with the city name only, on unseen capitals."""

from peftkit.recipe import Data, Launch, Lora, Model, Recipe, Train

# Transfer from pretraining, on 2 CPU cores in about 3 minutes. The base already knows many
# capitals but answers in a full sentence ("The capital of Japan is Tokyo."). Training teaches
# the short answer on some countries; the held-out countries' capitals never appear in the
# training data (scripts/make_capitals_data.py), so each held-out hit is a fact from
# pretraining carried into the new format. Exact match on them, before and after, is the
# measure. The Hub id resolves offline to a converted local copy (needs the offline source).
RECIPE = Recipe(
    model=Model("HuggingFaceTB/SmolLM2-135M-Instruct", arch="llama"),
    adapter=Lora(r=16, alpha=32, dropout=0.0, targets="all-linear"),
    data=Data("peftkit:data/capitals/train.jsonl", eval="peftkit:data/capitals/test.jsonl",
              format="chat", max_len=64, system_prompt="Answer with the city name only."),
    train=Train(lr=1e-3, batch_size=16, max_steps=80, warmup_steps=5, scheduler="cosine",
                log_every=10, eval_generate=100, max_new_tokens=12, seed=0),
    launch=Launch(hardware="CPU, 2 cores"),
)
