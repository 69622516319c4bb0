"""Rendering: a row -> text pieces -> tokens, with the loss masked to what the model learns.

Each row becomes a list of text *pieces*, each either prompt (no loss) or completion (loss,
ends with EOS). Pieces are tokenized separately with add_special_tokens=False and
concatenated, so a prompt's tokens at training time are exactly the tokens of the same prompt
rendered for generation at eval time (see `prompt_of`).

Chat rendering and the text after EOS: a chat template such as
`... Assistant: {content}<eos>\n` puts template text *after* the EOS of an assistant turn.
Labels stop at that EOS (it is what generation stops on); the "\n" after it starts the next
prompt piece, with no loss, just as it appears in the prompt rendered for the next turn. After
the last assistant turn the sample simply ends at EOS: trailing template text would carry no
loss and is never seen at generation time.
"""

from __future__ import annotations

from typing import NamedTuple

from peftkit.data.example import IGNORE, Example, Prompt
from peftkit.data.formats import FORMATS, format_named, to_messages, to_raw
from peftkit.data.sources import BadRow, one_line
from peftkit.data.tools import require_support, tools_of
from peftkit.errors import UserError
from peftkit.recipe.schema import Data


class Piece(NamedTuple):
    text: str
    completion: bool  # text the model learns to produce; always ends with EOS


# ---------------------------------------------------------------------------------------------
# The tokenizer: what rendering needs of it.

def _name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def _require_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"tokenizer {_name(tokenizer)} has no chat template, needed for chat "
                        f"and alpaca data; use an instruct model's tokenizer, set "
                        f"tokenizer.chat_template, or use format=prompt_completion/text")


def check_tokenizer(tokenizer, fmt: str) -> None:
    """Refuse a tokenizer that cannot render `fmt` or whose EOS would never be learned."""
    name = _name(tokenizer)
    if tokenizer.eos_token_id is None:
        raise UserError(f"tokenizer {name} has no EOS token; set one, the model must learn "
                        f"to stop")
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise UserError(f"tokenizer {name}: the pad token must be set and differ from EOS "
                        f"(id {tokenizer.eos_token_id}), or EOS would be masked as padding "
                        f"and never learned; add a dedicated pad token")
    # (An unknown format is reported by render_row, at the first row.)
    if fmt in FORMATS and FORMATS[fmt].chat:
        _require_chat_template(tokenizer)


# ---------------------------------------------------------------------------------------------
# A row -> text pieces (prompt / completion).

def _require_prefix(text: str, prefix: str, tokenizer, where: str) -> None:
    if not text.startswith(prefix):
        raise UserError(f"the chat template of {_name(tokenizer)} is not prefix-stable "
                        f"(rendering more turns changes the text of earlier ones, {where}), "
                        f"so assistant turns cannot be located; use a template without "
                        f"that behaviour or format=prompt_completion")


def _render(tokenizer, messages: list[dict], generation_prompt: bool, where: str,
            tools: list[dict] | None = None) -> str:
    _require_chat_template(tokenizer)
    import jinja2  # transformers renders chat templates with jinja2

    try:
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except jinja2.TemplateError as err:  # the template's raise_exception(), e.g. role order
        raise BadRow(f"{where}: the chat template of {_name(tokenizer)} rejected this "
                     f"conversation ({one_line(err)}); fix the row") from None


def _chat_pieces(messages: list[dict], tokenizer, where: str,
                 tools: list[dict] | None = None) -> list[Piece]:
    """Split a rendered conversation into prompt and completion pieces, one pair per
    assistant turn (tool calls included: the model learns to make them), by rendering it
    progressively (prompt = turns before it plus the generation prompt, completion = what
    the assistant turn adds to that). Tool results are prompt, like user turns."""
    eos = tokenizer.eos_token
    pieces, done = [], ""  # done = the text already assigned to pieces
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], True, where, tools)
        full = _render(tokenizer, messages[: i + 1], False, where, tools)
        _require_prefix(prompt, done, tokenizer, where)
        _require_prefix(full, prompt, tokenizer, where)
        completion = full[len(prompt):]
        # Labels stop at the turn's EOS; template text after it goes to the next prompt.
        end = completion.rfind(eos) if eos else -1
        if end >= 0:
            completion = completion[: end + len(eos)]
        pieces += [Piece(prompt[len(done):], False), Piece(completion, True)]
        done = prompt + completion
    if messages[-1]["role"] != "assistant":  # turns after the last answer: context only
        rest = _render(tokenizer, messages, False, where, tools)
        _require_prefix(rest, done, tokenizer, where)
        pieces.append(Piece(rest[len(done):], False))
    return pieces


def _raw_bos(tokenizer) -> str:
    # Raw text starts with BOS exactly when the tokenizer itself adds one to plain text
    # (Llama does, Qwen does not): that is how the model saw text in pretraining.
    bos = tokenizer.bos_token_id
    if bos is None or tokenizer("x")["input_ids"][:1] != [bos]:
        return ""
    return tokenizer.bos_token


def render_row(record: dict, fmt: str, tokenizer, cfg: Data,
               where: str) -> tuple[list[Piece], str | None]:
    """A row as text pieces, plus the reference answer for generation eval (None when the row
    has no prompt to generate from, as in text)."""
    if not format_named(fmt).chat:
        raw = to_raw(record, fmt, where)
        if raw.prompt is None:
            return [Piece(_raw_bos(tokenizer) + raw.completion, True)], None
        pieces = [Piece(_raw_bos(tokenizer) + raw.prompt, False), Piece(raw.completion, True)]
        return pieces, raw.completion.strip()
    messages = to_messages(record, fmt, where, cfg.system_prompt)
    tools = tools_of(record, where)
    require_support(tokenizer, messages, tools, _name(tokenizer), where)
    reference = [m["content"] for m in messages if m["role"] == "assistant"][-1]
    return _chat_pieces(messages, tokenizer, where, tools), reference.strip()


# ---------------------------------------------------------------------------------------------
# Pieces -> input_ids and labels.

def tokenize_pieces(tokenizer, samples: list[list[Piece]]) -> list[list[list[int]]]:
    """Token ids of every piece of every sample, in one batched tokenizer call."""
    texts = [piece.text for pieces in samples for piece in pieces]
    flat = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else []
    out, start = [], 0
    for pieces in samples:
        out.append(flat[start:start + len(pieces)])
        start += len(pieces)
    return out


def assemble(pieces: list[Piece], ids: list[list[int]], eos_id: int,
             cfg: Data) -> tuple[Example | None, bool]:
    """(example or None when truncation left no loss token, whether it was truncated)."""
    input_ids: list[int] = []
    labels: list[int] = []
    for piece, piece_ids in zip(pieces, ids):
        if piece.completion and piece_ids[-1:] != [eos_id]:
            piece_ids = piece_ids + [eos_id]  # the model must learn to stop
        input_ids += piece_ids
        trained = piece.completion or cfg.loss_on == "all"
        labels += piece_ids if trained else [IGNORE] * len(piece_ids)
    truncated = len(input_ids) > cfg.max_len
    input_ids, labels = input_ids[: cfg.max_len], labels[: cfg.max_len]
    if all(label == IGNORE for label in labels):
        return None, truncated
    return Example(input_ids, labels), truncated


def prompt_ids(pieces: list[Piece], ids: list[list[int]]) -> list[int]:
    """The tokens before the last completion: the prompt exactly as training saw it."""
    last = max(i for i, piece in enumerate(pieces) if piece.completion)
    return [token for piece_ids in ids[:last] for token in piece_ids]


def tokenize_record(record: dict, fmt: str, tokenizer, cfg: Data,
                    where: str) -> Example | None:
    """One row as a training example; None if truncation left no token with a loss."""
    pieces, _ = render_row(record, fmt, tokenizer, cfg, where)
    example, _ = assemble(pieces, tokenize_pieces(tokenizer, [pieces])[0],
                          tokenizer.eos_token_id, cfg)
    return example


def prompt_of(record: dict, fmt: str, tokenizer, cfg: Data, where: str) -> Prompt | None:
    """The prompt for the row's last answer and that answer as reference; None for text.

    The prompt is not truncated: generation needs all of it."""
    pieces, reference = render_row(record, fmt, tokenizer, cfg, where)
    if reference is None:
        return None
    return Prompt(prompt_ids(pieces, tokenize_pieces(tokenizer, [pieces])[0]), reference)
