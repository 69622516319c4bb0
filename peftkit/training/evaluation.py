"""Held-out evaluation: loss over labelled tokens, and exact match of greedy answers."""

from __future__ import annotations

from importlib import resources

import torch

from peftkit.data.batching import collate
from peftkit.data.example import Example, Prompt


def metric_path(name: str) -> str:
    """Metric modules ship with peftkit: `evaluate.load` cannot reach the Hub."""
    return str(resources.files("peftkit") / "assets" / "metrics" / name / f"{name}.py")


def my_share(items: list, accelerator) -> tuple[list, int]:
    """This process's share of `items`, padded with repeats of the first item to the length
    of the largest share (so every process runs the same number of forwards, as FSDP's
    collectives require); returns (share, how many of them are real)."""
    mine = items[accelerator.process_index::accelerator.num_processes]
    longest = -(-len(items) // accelerator.num_processes)
    return mine + items[:1] * (longest - len(mine)), len(mine)


@torch.no_grad()
def eval_loss(accelerator, loss_module, examples: list[Example], batch_size: int,
              pad_id: int) -> float:
    """Mean next-token loss over every labelled token of `examples`, all processes together."""
    loss_module.eval()
    mine, real = my_share(examples, accelerator)
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    for start in range(0, len(mine), batch_size):
        chunk = mine[start:start + batch_size]
        batch = {k: v.to(accelerator.device) for k, v in collate(chunk, pad_id).items()}
        if start + len(chunk) > real:  # padding rows (see my_share) count for nothing
            keep = torch.arange(start, start + len(chunk)) < real
            batch["labels"][~keep.to(accelerator.device)] = -100
        loss_sum, count = loss_module(**batch)
        total += torch.stack([loss_sum.double(), count.double()])
    total = accelerator.reduce(total, reduction="sum")
    loss_module.train()
    return (total[0] / total[1].clamp(min=1)).item()


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[Prompt], max_new_tokens: int,
                     device, batch_size: int = 64, synced: bool = False) -> list[str]:
    """Greedy completions of `prompts` (token ids), decoded without special tokens.
    `synced`: every process keeps stepping until all have finished (FSDP shards)."""
    was_training = model.training
    model.eval()
    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        width = max(len(p.input_ids) for p in chunk)
        # Left-pad so every prompt ends where generation starts.
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(chunk):
            ids[row, width - len(p.input_ids):] = torch.tensor(p.input_ids)
            mask[row, width - len(p.input_ids):] = 1
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                             max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                             pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id, synced_gpus=synced)
        answers += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    model.train(was_training)
    return [a.strip() for a in answers]


def exact_match(accelerator, model, tokenizer, prompts: list[Prompt],
                max_new_tokens: int) -> tuple[float, list[tuple[str, str, str]]]:
    """Exact match over `prompts`, shared between processes. Returns (score, samples)."""
    import evaluate
    from accelerate.utils import gather_object

    from peftkit.training.distributed import shards_weights

    mine, real = my_share(prompts, accelerator)
    answers = generate_answers(model, tokenizer, mine, max_new_tokens, accelerator.device,
                               synced=shards_weights(accelerator))
    mine, answers = mine[:real], answers[:real]
    rows = gather_object([(tokenizer.decode(p.input_ids, skip_special_tokens=True), a,
                           p.reference) for p, a in zip(mine, answers)])
    metric = evaluate.load(metric_path("exact_match"))
    score = metric.compute(predictions=[r[1] for r in rows], references=[r[2] for r in rows])
    return score["exact_match"], rows
