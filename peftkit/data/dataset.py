"""The train and eval sets of a recipe's data section, as `peftkit train` and `eval` use them.

    sources ──load_records──▶ rows ──mix_plan──▶ samples ──render_row──▶ pieces ──▶ Example
            (sources.py)            (mixing.py)          (formats.py, render.py)    / Prompt

A *source* is a local .jsonl/.json/.csv/.parquet file, `peftkit:<path>` (a file shipped under
peftkit/assets/) or a Hub dataset id; data.train names one, or several mixed with weights
(peftkit/recipe/train_sources.py). A row is one of the formats in formats.py, detected from
each source's first row unless data.format names it.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field

from peftkit.data.example import IGNORE, Example, Prompt
from peftkit.data.formats import check_source_format, detect_format
from peftkit.data.mixing import mix_plan
from peftkit.data.render import (assemble, check_tokenizer, prompt_ids, render_row,
                                 tokenize_pieces)
from peftkit.data.sources import BadRow, load_records
from peftkit.errors import UserError
from peftkit.recipe.schema import Data
from peftkit.recipe.train_sources import TrainSource, train_sources


@dataclass
class SourceStats:
    """What one source of data.train gave the training set."""

    source: str
    weight: str  # as data.train writes it: a share ("0.7"), passes ("2x"), "" (once)
    format: str
    rows: int  # rows it keeps for training (after the eval hold-out)
    samples: int  # training samples it supplies (after max_samples, skipped and dropped rows)


@dataclass
class DataStats:
    """What became of the training rows; len(train) == rows - dropped_no_labels."""

    rows: int  # valid training rows (after hold-out and max_samples, excluding skipped)
    skipped: int  # malformed rows skipped because of data.skip_bad_rows
    truncated: int  # samples cut to data.max_len
    dropped_no_labels: int  # samples left without a single loss token by truncation
    tokens: int
    loss_tokens: int
    format: str  # the format of every source, or "alpaca+sharegpt" for a mix of formats
    sources: list[SourceStats] = field(default_factory=list)  # in data.train order

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class _Encoded:
    """One row as trained: its example (None when truncation left no loss token)."""

    example: Example | None
    truncated: bool
    prompt: Prompt | None  # for generation eval; None for text rows


def _hold_out(rows: list, size: int, seed: int, source: str) -> tuple[list, list]:
    """Split `size` random rows off for eval; train keeps file order (the loop shuffles)."""
    if size <= 0:
        return rows, []
    if size >= len(rows):
        raise UserError(f"data.eval_size={size} would leave no training rows ({source} has "
                        f"{len(rows)}); lower data.eval_size or set data.eval")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held = set(order[:size])
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in order[:size]]


def _encode(rows: list, formats: list[str], tokenizer, cfg: Data,
            want_prompts: bool) -> tuple[list[_Encoded | None], int]:
    """Every row encoded (None for a malformed row skipped by data.skip_bad_rows), and the
    number skipped. Rows are rendered one by one, then tokenized in one batched call."""
    samples, references, kept = [], [], []
    for n, (row, fmt) in enumerate(zip(rows, formats)):
        try:
            pieces, reference = render_row(row, fmt, tokenizer, cfg, getattr(row, "where", "row"))
        except BadRow:
            if not cfg.skip_bad_rows:
                raise
            continue
        samples.append(pieces)
        references.append(reference)
        kept.append(n)
    encoded: list[_Encoded | None] = [None] * len(rows)
    for n, pieces, ids, reference in zip(kept, samples, tokenize_pieces(tokenizer, samples),
                                         references):
        example, truncated = assemble(pieces, ids, tokenizer.eos_token_id, cfg)
        prompt = (Prompt(prompt_ids(pieces, ids), reference)
                  if want_prompts and reference is not None else None)
        encoded[n] = _Encoded(example, truncated, prompt)
    return encoded, len(rows) - len(kept)


def _tally(encoded: list[_Encoded], stats: DataStats) -> list[Example]:
    """The examples of `encoded` (valid rows, one per sample), counted into `stats`."""
    stats.rows += len(encoded)
    examples = []
    for item in encoded:
        stats.truncated += item.truncated
        if item.example is None:
            stats.dropped_no_labels += 1
            continue
        examples.append(item.example)
        stats.tokens += len(item.example.input_ids)
        stats.loss_tokens += sum(label != IGNORE for label in item.example.labels)
    return examples


def _format_of(rows: list, cfg: Data) -> str:
    if cfg.format == "auto":
        return detect_format(rows[0], rows[0].where)
    check_source_format(rows[0], cfg.format, rows[0].where)
    return cfg.format


def _read(source: str, cfg: Data, tokenizer) -> tuple[list, int, str]:
    """(rows, malformed rows skipped, format) of one source, its format checked against the
    tokenizer."""
    rows, skipped = load_records(source, cfg.skip_bad_rows)
    fmt = _format_of(rows, cfg)
    check_tokenizer(tokenizer, fmt)
    return rows, skipped, fmt


def _stats(formats: list[str]) -> DataStats:
    return DataStats(rows=0, skipped=0, truncated=0, dropped_no_labels=0, tokens=0,
                     loss_tokens=0, format="+".join(dict.fromkeys(formats)))


def _plan(sources: list[TrainSource], groups: list[list], cfg: Data,
          seed: int) -> list[tuple[int, int]]:
    """(source, row) of each training sample: one unweighted source in file order (the loop
    shuffles), a mix as mixing.py draws it; at most data.max_samples."""
    for source, rows in zip(sources, groups):
        if not rows:
            raise UserError(f"data.train: {source.source} keeps no training rows after the "
                            f"eval hold-out (data.eval_size={cfg.eval_size}); lower "
                            "data.eval_size or set data.eval")
    if len(sources) == 1 and not sources[0].weight:
        plan = [(0, n) for n in range(len(groups[0]))]
        return plan[: cfg.max_samples] if cfg.max_samples > 0 else plan
    return mix_plan(sources, [len(rows) for rows in groups], seed, cfg.max_samples)


def _train_set(sources: list[TrainSource], groups: list[list], formats: list[str],
               tokenizer, cfg: Data, seed: int) -> tuple[list[Example], DataStats]:
    """Every row a sample draws is rendered once, however often the mix repeats it."""
    plan = _plan(sources, groups, cfg, seed)
    needed = sorted(set(plan))
    encoded, skipped = _encode([groups[s][r] for s, r in needed],
                               [formats[s] for s, _ in needed], tokenizer, cfg, False)
    by_row = dict(zip(needed, encoded))
    samples = [(s, by_row[s, r]) for s, r in plan if by_row[s, r] is not None]
    stats = _stats(formats)
    stats.skipped = skipped
    examples = _tally([item for _, item in samples], stats)
    stats.sources = [
        SourceStats(source.source, source.weight, fmt, len(rows),
                    sum(1 for s, item in samples if s == i and item.example is not None))
        for i, (source, rows, fmt) in enumerate(zip(sources, groups, formats))]
    return examples, stats


def build(cfg: Data, tokenizer, seed: int
          ) -> tuple[list[Example], list[Example], list[Prompt], DataStats]:
    """Train examples, eval examples, eval prompts (for exact-match generation), and the
    stats of the training set.

    Eval rows come from `cfg.eval`, or else `cfg.eval_size` rows are held out of the train
    rows (of all sources together) at random (seeded); the hold-out is taken before the mix
    and `cfg.max_samples`, so the eval set does not change with them.
    """
    sources = train_sources(cfg.train)
    read = [_read(source.source, cfg, tokenizer) for source in sources]
    formats = [fmt for _, _, fmt in read]
    pool = [(i, row) for i, (rows, _, _) in enumerate(read) for row in rows]
    if cfg.eval:
        eval_rows, _, eval_fmt = _read(cfg.eval, cfg, tokenizer)
        eval_formats = [eval_fmt] * len(eval_rows)
    else:
        pool, held = _hold_out(pool, cfg.eval_size, seed, cfg.train)
        eval_rows, eval_formats = [row for _, row in held], [formats[i] for i, _ in held]
    groups = [[row for i, row in pool if i == n] for n in range(len(sources))]
    train, stats = _train_set(sources, groups, formats, tokenizer, cfg, seed)
    stats.skipped += sum(skipped for _, skipped, _ in read)
    encoded, _ = _encode(eval_rows, eval_formats, tokenizer, cfg, want_prompts=True)
    evals = _tally([item for item in encoded if item is not None], _stats(eval_formats))
    prompts = [item.prompt for item in encoded if item is not None and item.prompt]
    if not train:
        raise UserError(f"{cfg.train}: no training example left (every row was skipped or "
                        f"had no loss token within data.max_len={cfg.max_len}); check the "
                        f"data or raise data.max_len")
    return train, evals, prompts, stats


def build_eval(cfg: Data, tokenizer, source: str) -> tuple[list[Example], list[Prompt]]:
    """Examples and prompts of every row of one source, rendered as `build` renders eval
    rows (for `peftkit eval --data FILE`)."""
    rows, _, fmt = _read(source, cfg, tokenizer)
    encoded, _ = _encode(rows, [fmt] * len(rows), tokenizer, cfg, want_prompts=True)
    kept = [item for item in encoded if item is not None]
    return _tally(kept, _stats([fmt])), [item.prompt for item in kept if item.prompt]
