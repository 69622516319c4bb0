"""The train and eval sets of a recipe's data section, as `peftkit train` and `eval` use them.

    source ──load_records──▶ rows ──render_row──▶ pieces ──tokenize──▶ Example / Prompt
           (sources.py)             (formats.py, render.py)      (render.py)

A *source* is a local .jsonl/.json/.csv/.parquet file, `peftkit:<path>` (a file shipped under
peftkit/assets/) or a Hub dataset id. A row is one of the formats in formats.py (chat, alpaca,
prompt_completion, text), detected from the first row unless data.format names it.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

from peftkit.data.example import IGNORE, Example, Prompt
from peftkit.data.formats import detect_format
from peftkit.data.render import (assemble, check_tokenizer, prompt_ids, render_row,
                                 tokenize_pieces)
from peftkit.data.sources import BadRow, load_records
from peftkit.errors import UserError
from peftkit.recipe.schema import Data


@dataclass
class DataStats:
    """What became of the training rows; len(train) == rows - dropped_no_labels."""

    rows: int  # valid training rows (after hold-out and max_samples, excluding skipped)
    skipped: int  # malformed rows skipped because of data.skip_bad_rows
    truncated: int  # samples cut to data.max_len
    dropped_no_labels: int  # samples left without a single loss token by truncation
    tokens: int
    loss_tokens: int
    format: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


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


def _encode_rows(rows: list, fmt: str, tokenizer, cfg: Data,
                 want_prompts: bool) -> tuple[list[Example], list[Prompt], DataStats]:
    samples, references = [], []
    stats = DataStats(rows=0, skipped=0, truncated=0, dropped_no_labels=0, tokens=0,
                      loss_tokens=0, format=fmt)
    for row in rows:
        where = getattr(row, "where", "row")
        try:
            pieces, reference = render_row(row, fmt, tokenizer, cfg, where)
        except BadRow:
            if not cfg.skip_bad_rows:
                raise
            stats.skipped += 1
            continue
        samples.append(pieces)
        references.append(reference)
    stats.rows = len(samples)
    examples, prompts = [], []
    for pieces, ids, reference in zip(samples, tokenize_pieces(tokenizer, samples), references):
        example, truncated = assemble(pieces, ids, tokenizer.eos_token_id, cfg)
        stats.truncated += truncated
        if example is None:
            stats.dropped_no_labels += 1
        else:
            examples.append(example)
            stats.tokens += len(example.input_ids)
            stats.loss_tokens += sum(label != IGNORE for label in example.labels)
        if want_prompts and reference is not None:
            prompts.append(Prompt(prompt_ids(pieces, ids), reference))
    return examples, prompts, stats


def _format_of(rows: list, cfg: Data) -> str:
    return cfg.format if cfg.format != "auto" else detect_format(rows[0], rows[0].where)


def build(cfg: Data, tokenizer, seed: int
          ) -> tuple[list[Example], list[Example], list[Prompt], DataStats]:
    """Train examples, eval examples, eval prompts (for exact-match generation), and the
    stats of the training set.

    Eval rows come from `cfg.eval`, or else `cfg.eval_size` rows are held out of the train
    rows at random (seeded); the hold-out is taken before `cfg.max_samples` caps the train
    rows, so the eval set does not change with max_samples.
    """
    rows, skipped = load_records(cfg.train, cfg.skip_bad_rows)
    fmt = _format_of(rows, cfg)
    check_tokenizer(tokenizer, fmt)
    if cfg.eval:
        eval_rows, _ = load_records(cfg.eval, cfg.skip_bad_rows)
        eval_fmt = _format_of(eval_rows, cfg)
        check_tokenizer(tokenizer, eval_fmt)
    else:
        rows, eval_rows = _hold_out(rows, cfg.eval_size, seed, cfg.train)
        eval_fmt = fmt
    if cfg.max_samples > 0:
        rows = rows[: cfg.max_samples]
    train, _, stats = _encode_rows(rows, fmt, tokenizer, cfg, want_prompts=False)
    stats.skipped += skipped
    evals, prompts, _ = _encode_rows(eval_rows, eval_fmt, tokenizer, cfg, want_prompts=True)
    if not train:
        raise UserError(f"{cfg.train}: no training example left (every row was skipped or "
                        f"had no loss token within data.max_len={cfg.max_len}); check the "
                        f"data or raise data.max_len")
    return train, evals, prompts, stats


def build_eval(cfg: Data, tokenizer, source: str) -> tuple[list[Example], list[Prompt]]:
    """Examples and prompts of every row of one source, rendered as `build` renders eval
    rows (for `peftkit eval --data FILE`)."""
    rows, _ = load_records(source, cfg.skip_bad_rows)
    fmt = _format_of(rows, cfg)
    check_tokenizer(tokenizer, fmt)
    examples, prompts, _ = _encode_rows(rows, fmt, tokenizer, cfg, want_prompts=True)
    return examples, prompts
