"""One epoch of a mix of training sources: which rows, how often, in what order.

data.train names the sources and their weights (peftkit.recipe.train_sources). Given the rows
each source keeps for training, `mix_plan` decides the samples, fixed by the seed:

  share p   the source supplies round(p x N) samples, N = the rows of all sources together
            (largest remainders, so the counts add up to N exactly); rows are drawn without
            replacement in a seeded order, and a source asked for more rows than it has goes
            through them again in a fresh order
  passes k  every row k times for whole k; the fraction takes a seeded subset (0.5x: half)

data.max_samples scales every source's count down in proportion (largest remainders again), so
a capped mix keeps its proportions. The samples are shuffled together (seeded); the same
samples make up every training epoch, which the loop reorders each epoch.
"""

from __future__ import annotations

import math
import random

from peftkit.recipe.train_sources import TrainSource


def _rng(seed: int, index: int, source: str) -> random.Random:
    return random.Random(f"{seed}:{index}:{source}")  # str seeds are stable across runs


def _draw(n: int, count: int, rng: random.Random) -> list[int]:
    """`count` row indices of `n` rows: whole passes over them, each in a fresh order."""
    drawn: list[int] = []
    while n and len(drawn) < count:
        order = list(range(n))
        rng.shuffle(order)
        drawn += order[: count - len(drawn)]
    return drawn


def _apportion(weights: list[float], total: int) -> list[int]:
    """`total` split in proportion to `weights`, by largest remainders (ties: first wins)."""
    quotas = [w * total / sum(weights) for w in weights]
    out = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(weights)), key=lambda i: (out[i] - quotas[i], i))
    for i in by_remainder[: total - sum(out)]:
        out[i] += 1
    return out


def counts(sources: list[TrainSource], sizes: list[int], limit: int = 0) -> list[int]:
    """Samples each source supplies to one epoch of the mix; at most `limit` in all (0: no
    limit), shared out in proportion."""
    if any(s.share is not None for s in sources):
        wanted = _apportion([s.share for s in sources], sum(sizes))
    else:
        wanted = [round((1.0 if s.passes is None else s.passes) * n)
                  for s, n in zip(sources, sizes)]
    if 0 < limit < sum(wanted):
        wanted = _apportion(wanted, limit)
    return wanted


def mix_plan(sources: list[TrainSource], sizes: list[int], seed: int,
             limit: int = 0) -> list[tuple[int, int]]:
    """(source index, row index) of every sample of one epoch of the mix, in its order."""
    plan = []
    for i, (source, n, count) in enumerate(zip(sources, sizes, counts(sources, sizes, limit))):
        plan += [(i, row) for row in _draw(n, count, _rng(seed, i, source.source))]
    random.Random(seed).shuffle(plan)
    return plan
