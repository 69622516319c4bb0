"""`peftkit show NAME --data`: what the recipe's data becomes, checked before any training.

The data is built exactly as `peftkit train` builds it (peftkit.data.dataset.build with the run's
tokenizer), then summarised: record counts, token lengths as trained (after truncation to
data.max_len), the share of tokens that carry loss, what truncation did, whether EOS is
trained, and two samples with their trained spans between ⟦ ⟧; for a mix of sources, what
each source supplies.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from peftkit.data.dataset import SourceStats, build
from peftkit.data.example import IGNORE
from peftkit.model.loading import base_path, load_tokenizer
from peftkit.recipe.schema import Recipe

OPEN, CLOSE = "⟦", "⟧"


@dataclass
class Report:
    train: str
    eval: str
    format: str
    rows: int  # valid training rows read (after hold-out and max_samples)
    skipped: int  # malformed rows skipped (data.skip_bad_rows)
    samples: int  # training samples kept
    eval_samples: int
    eval_prompts: int
    lengths: dict  # min / median / p90 / max tokens per training sample, as trained
    max_len: int
    truncated: int  # samples longer than max_len, cut to it
    dropped: int  # of those, samples left with no loss token, dropped
    tokens: int
    loss_tokens: int
    eos_trained: int  # samples whose labels include the EOS token
    rendered: list = field(default_factory=list)  # [(text, trained)] spans of two samples
    sources: list[SourceStats] = field(default_factory=list)  # data.train's, in its order

    @property
    def loss_share(self) -> float:
        return self.loss_tokens / self.tokens if self.tokens else 0.0


def percentile(values: list[int], q: float) -> int:
    """Nearest-rank percentile: the smallest value with at least q% of values <= it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def spans(example, tokenizer) -> list[tuple[str, bool]]:
    """A sample as (text, trained) runs: consecutive tokens with or without a loss label."""
    runs: list[tuple[list[int], bool]] = []
    for token, label in zip(example.input_ids, example.labels):
        trained = label != IGNORE
        if runs and runs[-1][1] == trained:
            runs[-1][0].append(token)
        else:
            runs.append(([token], trained))
    return [(tokenizer.decode(ids, skip_special_tokens=False), trained) for ids, trained in runs]


def preflight(recipe: Recipe, show_samples: int = 2) -> Report:
    tokenizer, _ = load_tokenizer(base_path(recipe.model), recipe.model)
    train, evals, prompts, stats = build(recipe.data, tokenizer, recipe.train.seed)
    lengths = [len(e.input_ids) for e in train]
    return Report(
        train=recipe.data.train, eval=recipe.data.eval or f"{recipe.data.eval_size} rows held "
        "out of train", format=stats.format, rows=stats.rows, skipped=stats.skipped,
        samples=len(train), eval_samples=len(evals), eval_prompts=len(prompts),
        lengths={"min": min(lengths), "median": statistics.median(lengths),
                 "p90": percentile(lengths, 90), "max": max(lengths)},
        max_len=recipe.data.max_len, truncated=stats.truncated,
        dropped=stats.dropped_no_labels, tokens=stats.tokens, loss_tokens=stats.loss_tokens,
        eos_trained=sum(tokenizer.eos_token_id in e.labels for e in train),
        rendered=[spans(e, tokenizer) for e in train[:show_samples]], sources=stats.sources)


def print_sources(sources: list[SourceStats], console) -> None:
    """The mix: each source's weight, format, rows and share of the training samples."""
    total = sum(s.samples for s in sources) or 1
    console.print("  mix (one epoch; shares as trained, after max_samples and drops):")
    for s in sources:
        weight = f"={s.weight}" if s.weight else " (once)"
        console.print(f"    {s.source}{weight} ({s.format}): {s.rows:,} rows -> "
                      f"{s.samples:,} samples, {100 * s.samples / total:.1f}%")


def print_report(report: Report, console) -> None:
    from rich.text import Text

    r = report
    console.print(f"\n[bold]data[/] ({r.format}): {r.train}")
    console.print(f"  records: {r.rows:,} train rows -> {r.samples:,} samples"
                  + (f", {r.skipped:,} malformed rows skipped" if r.skipped else "")
                  + f"; eval: {r.eval_samples:,} samples, {r.eval_prompts:,} prompts "
                  f"({r.eval})")
    if len(r.sources) > 1 or any(s.weight for s in r.sources):
        print_sources(r.sources, console)
    lengths = r.lengths
    console.print(f"  tokens per sample (as trained): min {lengths['min']}, median "
                  f"{lengths['median']:g}, p90 {lengths['p90']}, max {lengths['max']}")
    console.print(f"  tokens carrying loss: {r.loss_tokens:,} of {r.tokens:,} "
                  f"({100 * r.loss_share:.1f}%)")
    if r.truncated:
        console.print(f"  [yellow]{r.truncated:,} samples exceed data.max_len={r.max_len}[/]: "
                      f"truncated to {r.max_len} tokens; {r.dropped:,} of them dropped (no "
                      "loss token left)")
    else:
        console.print(f"  no sample exceeds data.max_len={r.max_len}")
    eos = "[green]" if r.eos_trained == r.samples else "[red]"
    console.print(f"  EOS trained in {eos}{r.eos_trained:,} of {r.samples:,}[/] samples")
    for n, sample in enumerate(r.rendered, 1):
        console.print(f"  sample {n} (trained tokens between {OPEN} {CLOSE}):")
        text = Text("    ")
        for piece, trained in sample:
            piece = piece.replace("\n", "\n    ")  # keep the sample indented
            text.append(f"{OPEN}{piece}{CLOSE}" if trained else piece,
                        style="bold green" if trained else "dim")
        console.print(text)
