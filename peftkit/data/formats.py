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
from peftkit.data.tools import tool_call
from peftkit.errors import UserError

ROLES = ("system", "user", "assistant", "tool")  # tool: a tool's result (see tools.py)
# ShareGPT's speakers as chat roles.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "tool": "tool", "function": "tool"}


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


def _invalid(where: str, what: str, value, fmt: str, noun: str) -> BadRow:
    shown = json.dumps(value, ensure_ascii=False, default=str)[:80]
    return BadRow(f"{where}: {what} = {shown} is not a valid {noun}; expected "
                  f"{FORMATS[fmt].expected}")


def _with_answer(messages: list[dict], where: str, fmt: str) -> list[dict]:
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRow(f"{where}: no assistant turn to learn from; expected "
                     f"{FORMATS[fmt].expected}")
    return messages


def _message(message, n: int, where: str) -> dict:
    """One chat message, validated; only the keys a chat template reads (columnar files add
    absent keys, e.g. "name": None, that a template would otherwise render)."""
    if not isinstance(message, dict):
        raise _invalid(where, f"messages[{n}]", message, "chat", "message")
    role, content = message.get("role"), message.get("content")
    calls = message.get("tool_calls") if role == "assistant" else None
    if calls is not None and not isinstance(calls, list):
        raise _invalid(where, f"messages[{n}].tool_calls", calls, "chat", "list of calls")
    if content is None and calls:
        content = ""  # an assistant turn that only calls tools
    if role not in ROLES or not isinstance(content, str):
        raise _invalid(where, f"messages[{n}]", message, "chat", "message")
    clean = {"role": role, "content": content}
    if calls:
        clean["tool_calls"] = [tool_call(call, where, n) for call in calls]
    if role == "tool":
        clean.update({k: message[k] for k in ("name", "tool_call_id")
                      if isinstance(message.get(k), str)})
    return clean


def _chat(record: dict, where: str) -> list[dict]:
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRow(f"{where}: 'messages' is missing, empty or not a list; expected "
                     f"{FORMATS['chat'].expected}")
    return _with_answer([_message(m, n, where) for n, m in enumerate(messages)], where, "chat")


def _sharegpt(record: dict, where: str) -> list[dict]:
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise BadRow(f"{where}: 'conversations' is missing, empty or not a list; expected "
                     f"{FORMATS['sharegpt'].expected}")
    messages = []
    for n, turn in enumerate(turns):
        role = SHAREGPT_ROLES.get(turn.get("from")) if isinstance(turn, dict) else None
        value = turn.get("value") if isinstance(turn, dict) else None
        if role is None or not isinstance(value, str):
            raise _invalid(where, f"conversations[{n}]", turn, "sharegpt", "turn")
        messages.append({"role": role, "content": value})
    system = record.get("system")  # some ShareGPT exports keep the system prompt beside
    if isinstance(system, str) and system.strip() and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    return _with_answer(messages, where, "sharegpt")


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
           'with at least one assistant turn (tool use: assistant "tool_calls", role "tool")',
           to_messages=_chat),
    Format("sharegpt", ("conversations",),
           '"conversations": a list of {"from": "human"|"gpt"|"system"|"tool", "value": '
           "string} with at least one gpt turn", to_messages=_sharegpt),
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


def _present(record: dict) -> set[str]:
    # Columnar files (json/csv/parquet) give every row every column, absent ones as None.
    return {key for key, value in record.items() if value is not None}


def detect_format(record: dict, where: str) -> str:
    """The first format (in FORMATS order) whose fields the record has."""
    present = _present(record)
    for fmt in FORMATS.values():
        if present.issuperset(fmt.fields):
            return fmt.name
    options = "; ".join(f"{fmt.name} = {fmt.expected}" for fmt in FORMATS.values())
    raise UserError(f"{where}: cannot tell the data format from the fields "
                    f"{sorted(present)}; expected one of: {options} (or set data.format)")


def check_source_format(record: dict, fmt: str, source: str) -> None:
    """Refuse a source whose first row has another format's fields and not `fmt`'s, saying
    which format it looks like and which setting to change (a later odd row is a bad row)."""
    spec, present = format_named(fmt), _present(record)
    if present.issuperset(spec.fields):
        return
    for other in FORMATS.values():
        if present.issuperset(other.fields):
            fields = ", ".join(repr(f) for f in other.fields)
            raise UserError(f"{source}: data.format={fmt}, but the data looks like {other.name} "
                            f"(its first row has {fields}); set data.format={other.name}, or "
                            f"auto to detect each source's format")


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


def to_raw(record: dict, fmt: str, where: str) -> RawText:
    """The prompt and completion of a row of a raw format (validated)."""
    return format_named(fmt).to_raw(record, where)
