"""Data formats: which fields identify each, and what a row of it becomes.

FORMATS holds one `Format` per format, in detection order: its name, the fields whose presence
identifies it, how errors describe a valid row, and one function that validates a row and
converts it either to chat messages (rendered with the tokenizer's chat template) or to raw
text (tokenized as is). Adding a format is one entry and one function here, plus its name in
peftkit.recipe.schema.DATA_FORMATS (recipe/ cannot import data/; a test checks they agree).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

from peftkit.data.sources import BadRow
from peftkit.errors import UserError

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class RawText:
    """A row of a raw format: text the tokenizer sees as is, no chat template."""

    prompt: str | None  # no loss; None: the whole row is learned and there is nothing to prompt
    completion: str  # the text the model learns to produce


@dataclass(frozen=True)
class Format:
    name: str
    fields: tuple[str, ...]  # present (not None) in every row of this format: what auto detects
    expected: str  # a valid row, as error messages describe it
    # Exactly one of the two: (row, where) -> its content, validated (raises BadRow).
    to_messages: Callable[[dict, str], list[dict]] | None = None
    to_raw: Callable[[dict, str], RawText] | None = None

    @property
    def chat(self) -> bool:
        """Rendered with the tokenizer's chat template, so it needs a tokenizer that has one."""
        return self.to_messages is not None


def _string(record: dict, key: str, fmt: str, where: str, optional: bool = False) -> str:
    value = record.get(key)
    if value is None and optional:
        return ""
    if value is None:
        raise BadRow(f"{where}: missing {key!r}; expected {FORMATS[fmt].expected}")
    if not isinstance(value, str):
        raise BadRow(f"{where}: {key!r} is a {type(value).__name__}, not a string; "
                     f"expected {FORMATS[fmt].expected}")
    return value


def _chat(record: dict, where: str) -> list[dict]:
    expected = FORMATS["chat"].expected
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        problem = "'messages' is missing, empty or not a list"
        raise BadRow(f"{where}: {problem}; expected {expected}")
    clean = []
    for n, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if role not in ROLES or not isinstance(content, str):
            shown = json.dumps(message, ensure_ascii=False, default=str)[:80]
            raise BadRow(f"{where}: messages[{n}] = {shown} is not a valid message; "
                         f"expected {expected}")
        # Keep only role and content: columnar files add absent keys (e.g. "name": None)
        # that a chat template would otherwise render.
        clean.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in clean):
        raise BadRow(f"{where}: no assistant turn to learn from; expected {expected}")
    return clean


def _alpaca(record: dict, where: str) -> list[dict]:
    instruction = _string(record, "instruction", "alpaca", where)
    extra = _string(record, "input", "alpaca", where, optional=True)
    output = _string(record, "output", "alpaca", where)
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def _prompt_completion(record: dict, where: str) -> RawText:
    prompt = _string(record, "prompt", "prompt_completion", where)
    return RawText(prompt, _string(record, "completion", "prompt_completion", where))


def _text(record: dict, where: str) -> RawText:
    return RawText(None, _string(record, "text", "text", where))


FORMATS = {f.name: f for f in (
    Format("chat", ("messages",),
           '"messages": a list of {"role": "system"|"user"|"assistant", "content": string} '
           "with at least one assistant turn", to_messages=_chat),
    Format("alpaca", ("instruction", "output"),
           '"instruction" and "output" strings (and an optional "input" string)',
           to_messages=_alpaca),
    Format("prompt_completion", ("prompt", "completion"), '"prompt" and "completion" strings',
           to_raw=_prompt_completion),
    Format("text", ("text",), 'a "text" string', to_raw=_text),
)}


def format_named(name: str) -> Format:
    if name not in FORMATS:
        raise UserError(f"data.format={name!r}: must be one of {', '.join(FORMATS)}")
    return FORMATS[name]


def detect_format(record: dict, where: str) -> str:
    """The format whose fields the record has: chat, alpaca, prompt_completion or text."""
    # Columnar files (json/csv/parquet) give every row every column, absent ones as None.
    present = {key for key, value in record.items() if value is not None}
    for fmt in FORMATS.values():
        if present.issuperset(fmt.fields):
            return fmt.name
    options = "; ".join(f"{fmt.name} = {fmt.expected}" for fmt in FORMATS.values())
    raise UserError(f"{where}: cannot tell the data format from the fields "
                    f"{sorted(present)}; expected one of: {options} (or set data.format)")


def to_messages(record: dict, fmt: str, where: str,
                system_prompt: str = "") -> list[dict] | None:
    """Chat messages of a row of a chat format (validated); None for the raw formats."""
    spec = format_named(fmt)
    if not spec.chat:
        return None
    messages = spec.to_messages(record, where)
    # A conversation that brings its own system message keeps it.
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}] + messages
    return messages
