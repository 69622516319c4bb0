"""Preference pairs: rows of `{"prompt", "chosen", "rejected"}` -> a chosen and a rejected
`Example` that share their prompt tokens, loss only on the responses.

The community's two shapes are read (TRL's "standard" and "conversational" preference data):

- strings: `prompt`, `chosen` and `rejected` are text; the prompt becomes a user turn and each
  response an assistant turn;
- conversational: `prompt` is a list of messages (or a string), `chosen`/`rejected` are lists
  of assistant messages. Lists that repeat the prompt's turns first (as
  HuggingFaceH4/ultrafeedback_binarized does) have them removed; without a `prompt` column the
  turns the two lists share are the prompt.

Both are rendered with the tokenizer's chat template (render.py): the prompt exactly as it is
rendered for generation, each response as the assistant turn that follows it, ending at EOS.
"""

from __future__ import annotations

from dataclasses import dataclass

from peftkit.data.dataset import DataStats, _hold_out
from peftkit.data.example import IGNORE, Example, Prompt
from peftkit.data.formats import ROLES, detect_format
from peftkit.data.render import Piece, assemble, check_tokenizer, render_row, tokenize_pieces
from peftkit.data.sources import BadRow, load_records
from peftkit.errors import UserError
from peftkit.recipe.schema import Data

EXPECTED = ('"prompt" (a string or a list of messages), "chosen" and "rejected" (strings, or '
            'lists of assistant messages)')


@dataclass
class PreferencePair:
    """A prompt's preferred and dispreferred responses, as two examples with the same prompt
    tokens. The reference policy's log-probabilities of each are filled in before training
    (peftkit/training/preference.py)."""

    chosen: Example
    rejected: Example
    ref_chosen: float = 0.0
    ref_rejected: float = 0.0

    # Both sequences, end to end: what the batch stream's token counts and the resume
    # fingerprint (training/resume.py) read of a training item.
    @property
    def input_ids(self) -> list[int]:
        return self.chosen.input_ids + self.rejected.input_ids

    @property
    def labels(self) -> list[int]:
        return self.chosen.labels + self.rejected.labels


@dataclass
class PreferenceStats(DataStats):
    identical: int = 0  # pairs whose chosen and rejected responses are the same: dropped


def _messages(value, key: str, where: str, roles: tuple[str, ...]) -> list[dict]:
    if isinstance(value, str):
        return [{"role": roles[0], "content": value}]
    if not isinstance(value, list) or not value:
        raise BadRow(f"{where}: {key!r} is {type(value).__name__ if value is not None else 'missing'}"
                     f", not a string or a list of messages; expected {EXPECTED}")
    out = []
    for n, message in enumerate(value):
        role = message.get("role") if isinstance(message, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if role not in ROLES or not isinstance(content, str):
            raise BadRow(f"{where}: {key}[{n}] is not a message with a role "
                         f"({'/'.join(ROLES)}) and string content; expected {EXPECTED}")
        out.append({"role": role, "content": content})
    return out


def _shared_prefix(a: list[dict], b: list[dict]) -> int:
    n = 0
    while n < min(len(a), len(b)) - 1 and a[n] == b[n]:
        n += 1
    return n


def pair_messages(row: dict, where: str) -> tuple[list[dict], list[dict], list[dict]]:
    """(prompt, chosen, rejected) messages of a row, validated (raises BadRow)."""
    for key in ("chosen", "rejected"):
        if row.get(key) is None:
            raise BadRow(f"{where}: missing {key!r}; expected {EXPECTED}")
    chosen = _messages(row["chosen"], "chosen", where, ("assistant",))
    rejected = _messages(row["rejected"], "rejected", where, ("assistant",))
    if row.get("prompt") is None:  # implicit prompt: the turns both conversations share
        shared = _shared_prefix(chosen, rejected)
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    else:
        prompt = _messages(row["prompt"], "prompt", where, ("user",))
        # Conversations that repeat the prompt before the response (ultrafeedback_binarized).
        chosen = chosen[len(prompt):] if chosen[:len(prompt)] == prompt else chosen
        rejected = rejected[len(prompt):] if rejected[:len(prompt)] == prompt else rejected
    if not prompt or prompt[-1]["role"] == "assistant":
        raise BadRow(f"{where}: no prompt turn before the responses; expected {EXPECTED}")
    for key, turns in (("chosen", chosen), ("rejected", rejected)):
        if not turns or any(m["role"] != "assistant" for m in turns):
            raise BadRow(f"{where}: {key!r} must hold the assistant's response after the "
                         f"prompt (only assistant messages); expected {EXPECTED}")
    return prompt, chosen, rejected


def _response_pieces(prompt: list[dict], response: list[dict], tokenizer, cfg: Data,
                     where: str) -> list[Piece]:
    """Chat pieces of prompt + response with loss only on the response's turns: assistant
    turns inside the prompt (earlier conversation) are context."""
    record = {"messages": prompt + response}
    pieces, _ = render_row(record, "chat", tokenizer, cfg, where)
    in_prompt = sum(m["role"] == "assistant" for m in prompt)
    out, seen = [], 0
    for piece in pieces:
        if piece.completion:
            seen += 1
        out.append(Piece(piece.text, piece.completion and seen > in_prompt))
    return out


def _check_shape(rows: list, source: str) -> None:
    """Refuse SFT-shaped data at once (one line), rather than every row as a bad pair."""
    first = rows[0]
    if first.get("chosen") is None and first.get("rejected") is None:
        try:
            found = f"looks like {detect_format(first, first.where)} data"
        except UserError:
            found = f"has the fields {sorted(k for k, v in first.items() if v is not None)}"
        raise UserError(f"{first.where}: a preference objective needs pairs ({EXPECTED}), "
                        f"but {source} {found}; use train.objective=sft for it")


def encode_pairs(rows: list, tokenizer, cfg: Data) -> tuple[list[PreferencePair],
                                                             PreferenceStats]:
    stats = PreferenceStats(rows=0, skipped=0, truncated=0, dropped_no_labels=0, tokens=0,
                            loss_tokens=0, format="preference")
    rendered = []
    for row in rows:
        where = getattr(row, "where", "row")
        try:
            prompt, chosen, rejected = pair_messages(row, where)
            rendered.append((_response_pieces(prompt, chosen, tokenizer, cfg, where),
                             _response_pieces(prompt, rejected, tokenizer, cfg, where)))
        except BadRow:
            if not cfg.skip_bad_rows:
                raise
            stats.skipped += 1
    stats.rows = len(rendered)
    flat = [pieces for pair in rendered for pieces in pair]
    ids = tokenize_pieces(tokenizer, flat)
    pairs = []
    for i in range(0, len(flat), 2):
        (chosen, cut_c), (rejected, cut_r) = (
            assemble(flat[i + k], ids[i + k], tokenizer.eos_token_id, cfg) for k in (0, 1))
        stats.truncated += cut_c or cut_r
        if chosen is None or rejected is None:
            stats.dropped_no_labels += 1
        elif chosen.input_ids == rejected.input_ids:
            stats.identical += 1  # no preference to learn
        else:
            pairs.append(PreferencePair(chosen, rejected))
            stats.tokens += len(chosen.input_ids) + len(rejected.input_ids)
            stats.loss_tokens += sum(label != IGNORE for label in chosen.labels + rejected.labels)
    return pairs, stats


def build(cfg: Data, tokenizer, seed: int
          ) -> tuple[list[PreferencePair], list[PreferencePair], list, PreferenceStats]:
    """Train pairs, held-out pairs, no generation prompts, and the training set's stats
    (held out as dataset.build holds out rows: before max_samples, seeded)."""
    rows, skipped = load_records(cfg.train, cfg.skip_bad_rows)
    _check_shape(rows, cfg.train)
    check_tokenizer(tokenizer, "chat")
    if cfg.eval:
        eval_rows, _ = load_records(cfg.eval, cfg.skip_bad_rows)
        _check_shape(eval_rows, cfg.eval)
    else:
        rows, eval_rows = _hold_out(rows, cfg.eval_size, seed, cfg.train)
    if cfg.max_samples > 0:
        rows = rows[: cfg.max_samples]
    train, stats = encode_pairs(rows, tokenizer, cfg)
    stats.skipped += skipped
    held_out, _ = encode_pairs(eval_rows, tokenizer, cfg)
    if not train:
        why = (f"every pair's chosen and rejected responses are identical ({stats.identical})"
               if stats.identical else "every row was skipped or had no response token "
               f"within data.max_len={cfg.max_len}")
        raise UserError(f"{cfg.train}: no preference pair left to train on: {why}")
    return train, held_out, [], stats


def as_examples(pairs: list[PreferencePair], tokenizer) -> tuple[list[Example], list[Prompt]]:
    """The chosen side of `pairs`, as SFT-shaped held-out data: its examples (next-token loss
    on the preferred responses) and prompts with the preferred response as reference. What
    `peftkit eval` scores and the merge probe (training/probe.py) is made of."""
    examples, prompts = [], []
    for pair in pairs:
        chosen = pair.chosen
        start = next(i for i, label in enumerate(chosen.labels) if label != IGNORE)
        examples.append(chosen)
        answer = tokenizer.decode(chosen.input_ids[start:], skip_special_tokens=True)
        prompts.append(Prompt(chosen.input_ids[:start], answer.strip()))
    return examples, prompts


def held_out(cfg: Data, tokenizer, seed: int, source: str = "") -> list[PreferencePair]:
    """`source`'s pairs read whole, else a run's held-out pairs rebuilt as `build` built them."""
    if source or cfg.eval:
        rows, _ = load_records(source or cfg.eval, cfg.skip_bad_rows)
        _check_shape(rows, source or cfg.eval)
        check_tokenizer(tokenizer, "chat")
        return encode_pairs(rows, tokenizer, cfg)[0]
    return build(cfg, tokenizer, seed)[1]
