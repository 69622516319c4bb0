"""The forgetting meter: a real base's loss on general English, without and with the adapter.

Fine-tuning a pretrained model on a narrow task can damage what it could already do. The
meter measures the next-token loss on a small fixed sample of everyday English (64 real
conversations from the MIT-licensed chitchat-dataset, built by
scripts/make_forgetting_sample.py) twice in the finish phase: with the adapter disabled
(peft's `disable_adapter()`: exactly the base) and enabled. One model in memory, no second copy
of the base, and a resumed run measures the same. A relative rise past `train.forgetting_warn`
is reported as a warning; the figures go into result.json and the model card.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from peftkit.data.example import Example
from peftkit.data.sources import resolve_source
from peftkit.recipe.schema import Recipe
from peftkit.training.evaluation import eval_loss

CORPUS = "peftkit:data/chitchat_sample/sample.jsonl"
MAX_TOKENS = 128  # per sample; the texts are ~100 tokens, so this rarely cuts


@dataclass
class Forgetting:
    before: float   # loss of the base (adapter disabled) on the sample
    after: float    # loss with the trained adapter
    rise: float     # (after - before) / before: 0.05 = 5% higher loss
    corpus: str
    samples: int

    def to_dict(self) -> dict:
        return asdict(self)


def enabled(recipe: Recipe) -> bool:
    """train.forgetting, where unset: on for a real base, off for a tiny random one (its
    "general ability" is noise, and the tests need speed)."""
    choice = recipe.train.forgetting
    return not recipe.model.tiny if choice is None else choice


def sample_examples(tokenizer, corpus: str = CORPUS) -> list[Example]:
    """The sample as plain text (no chat template), every token labelled."""
    lines = Path(resolve_source(corpus)).read_text(encoding="utf-8").splitlines()
    examples = []
    for line in lines:
        ids = tokenizer(json.loads(line)["text"])["input_ids"][:MAX_TOKENS]
        examples.append(Example(input_ids=ids, labels=list(ids)))
    return examples


def measure(accelerator, loss_module, peft_model, tokenizer, batch_size: int,
            corpus: str = CORPUS) -> Forgetting:
    """Loss on the sample with the adapter disabled (the base) and enabled (the trained run)."""
    examples = sample_examples(tokenizer, corpus)
    pad = tokenizer.pad_token_id
    after = eval_loss(accelerator, loss_module, examples, batch_size, pad)
    with peft_model.disable_adapter():
        before = eval_loss(accelerator, loss_module, examples, batch_size, pad)
    return Forgetting(before, after, (after - before) / before, corpus, len(examples))


def warning(result: Forgetting, threshold: float) -> str | None:
    """One line when the loss on general text rose past `threshold` (relative), else None."""
    if result.rise <= threshold:
        return None
    return (f"general-text loss rose {100 * result.rise:.1f}% ({result.before:.3f} -> "
            f"{result.after:.3f}) past train.forgetting_warn={threshold:g}: the adapter may "
            "have damaged the base's general ability; try a lower train.lr, fewer steps or "
            "a smaller adapter.r")
