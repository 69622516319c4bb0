"""Training data: read rows, render them with the tokenizer, and mask the loss.

    source ──load_records──▶ rows ──_sample──▶ pieces ──tokenize──▶ Example / Prompt

A *source* is a local .jsonl/.json/.csv/.parquet file, `peftkit:<path>` (a file shipped under
peftkit/assets/) or a Hub dataset id. A row is one of four formats (chat, alpaca,
prompt_completion, text). Each row becomes a list of text *pieces*, each either prompt (no
loss) or completion (loss, ends with EOS). Pieces are tokenized separately with
add_special_tokens=False and concatenated, so a prompt's tokens at training time are exactly
the tokens of the same prompt rendered for generation at eval time (see `prompt_of`).

Chat rendering and the text after EOS: a chat template such as
`... Assistant: {content}<eos>\n` puts template text *after* the EOS of an assistant turn.
Labels stop at that EOS (it is what generation stops on); the "\n" after it starts the next
prompt piece, with no loss, just as it appears in the prompt rendered for the next turn. After
the last assistant turn the sample simply ends at EOS: trailing template text would carry no
loss and is never seen at generation time.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.resources
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from peftkit.recipe.schema import Data
from peftkit.errors import UserError

IGNORE = -100  # label of a token that carries no loss (the value torch's cross_entropy skips)

FILE_TYPES = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
ASSET_PREFIX = "peftkit:"
ROLES = ("system", "user", "assistant")

# Fields that identify a format, in detection order, and how an error describes them.
FORMAT_FIELDS = {
    "chat": ("messages",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
EXPECTED = {
    "chat": '"messages": a list of {"role": "system"|"user"|"assistant", "content": string} '
            "with at least one assistant turn",
    "alpaca": '"instruction" and "output" strings (and an optional "input" string)',
    "prompt_completion": '"prompt" and "completion" strings',
    "text": 'a "text" string',
}


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss; same length as input_ids


@dataclass
class Prompt:
    """A held-out prompt for generation-based eval (exact match)."""

    input_ids: list[int]  # the rendered prompt up to and including the generation prompt
    reference: str  # the expected completion text, stripped


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


class Row(dict):
    """A record plus where it came from ("train.jsonl:12"), so errors can point at it."""

    def __init__(self, record: dict, where: str):
        super().__init__(record)
        self.where = where


class BadRow(UserError):
    """A problem with one row: skipped (and counted) instead when data.skip_bad_rows is set."""


class Piece(NamedTuple):
    text: str
    completion: bool  # text the model learns to produce; always ends with EOS


# ---------------------------------------------------------------------------------------------
# Sources: files, shipped assets, Hub datasets.

def resolve_source(source: str) -> str:
    """`peftkit:<path>` -> absolute path of the file under peftkit/assets/; else unchanged."""
    if not source.startswith(ASSET_PREFIX):
        return source
    assets = Path(str(importlib.resources.files("peftkit") / "assets"))
    path = assets / source[len(ASSET_PREFIX):].lstrip("/")
    if not path.is_file():
        shipped = sorted(f"{ASSET_PREFIX}{p.relative_to(assets).as_posix()}"
                         for p in assets.rglob("*") if p.suffix in FILE_TYPES)
        raise UserError(f"{source}: no such data file ships with peftkit; "
                        f"available: {', '.join(shipped) or 'none'}")
    return str(path)


def _is_local(source: str) -> bool:
    """A path (existing or meant to be one) rather than a Hub id like "owner/name"."""
    return (os.path.exists(source) or os.path.splitext(source)[1].lower() in FILE_TYPES
            or source.startswith(("/", "./", "../", "~")))


def load_records(source: str, skip_bad_rows: bool = False) -> tuple[list[dict], int]:
    """Read every record of a source. Returns (rows, number of malformed rows skipped).

    Each row is a dict that also carries `.where` ("file:line" for JSONL, "file row N" for
    the other file types, 1-based) for error messages.
    """
    path = resolve_source(source)
    if _is_local(path):
        rows, skipped = _read_file(os.path.expanduser(path), skip_bad_rows)
    else:
        rows, skipped = _read_hub(source), 0
    if not rows:
        raise UserError(f"{path}: no records (every row was blank or skipped); "
                        f"add data or point data.train/data.eval at another file")
    return rows, skipped


def _read_file(path: str, skip_bad_rows: bool) -> tuple[list[Row], int]:
    kind = FILE_TYPES.get(os.path.splitext(path)[1].lower())
    if not os.path.exists(path):
        raise UserError(f"{path}: file not found; check the path (data files: "
                        f"{'/'.join(FILE_TYPES)}, or peftkit:<asset>, or a Hub dataset id)")
    if os.path.isdir(path) or kind is None:
        raise UserError(f"{path}: not a data file; use a {'/'.join(FILE_TYPES)} file")
    if os.path.getsize(path) == 0:
        raise UserError(f"{path}: the file is empty; add records (one JSON object per line "
                        f"for .jsonl)")
    try:
        with open(path, "rb"):
            pass  # fail here, with a clear message, rather than deep inside a reader
        if kind == "jsonl":
            return _read_jsonl(path, skip_bad_rows)
        return _read_with_datasets(path, kind), 0
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot read the file ({_one_line(err)}); check its "
                        f"permissions and that it is UTF-8 {kind}") from None


def _read_jsonl(path: str, skip_bad_rows: bool) -> tuple[list[Row], int]:
    # Read lines ourselves rather than through `datasets`: it is as fast for the sizes we
    # fine-tune on, and a malformed line can be reported (or skipped) by its line number.
    rows, skipped = [], 0
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue  # blank lines (e.g. a trailing newline) are not records
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                problem = f"malformed JSON at column {err.colno}: {err.msg}"
            else:
                if isinstance(record, dict):
                    rows.append(Row(record, where))
                    continue
                problem = f"a JSON {type(record).__name__}, not an object"
            if not skip_bad_rows:
                raise BadRow(f"{where}: {problem}; each line must be one JSON object "
                             f"(or set data.skip_bad_rows=true)")
            skipped += 1
    return rows, skipped


def _read_with_datasets(path: str, kind: str) -> list[Row]:
    import datasets  # imported here: it takes a while and only file/Hub loading needs it

    options = {}
    if kind == "csv":
        # Keep every cell as the exact string in the file: otherwise pandas turns a column
        # of answers like "007" into the integer 7 and the word "NA" into a missing value.
        with open(path, newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), [])
        string = datasets.Value("string")
        options = {"features": datasets.Features({c: string for c in header}),
                   "keep_default_na": False}
    try:
        table = datasets.load_dataset(kind, data_files=path, split="train", **options)
    except Exception as err:  # datasets wraps parser errors; the cause says what is wrong
        cause = err.__cause__ or err
        raise UserError(f"{path}: cannot parse it as {kind} ({type(cause).__name__}: "
                        f"{_one_line(cause)}); fix the file or convert it to .jsonl") from None
    return [Row(record, f"{path} row {i}") for i, record in enumerate(table.to_list(), 1)]


def _read_hub(source: str) -> list[Row]:
    """`owner/name` (split "train") or `owner/name:split` from the Hugging Face Hub."""
    import datasets
    from huggingface_hub import constants

    name, _, split = source.partition(":")
    split = split or "train"
    try:
        table = datasets.load_dataset(name, split=split)
    except Exception as err:
        if constants.HF_HUB_OFFLINE or isinstance(err, ConnectionError):
            raise UserError(f"{source}: not a local file, and the Hugging Face Hub is "
                            f"unreachable (offline); download the dataset where the Hub is "
                            f"reachable and point data.train/data.eval at a local "
                            f"{'/'.join(FILE_TYPES)} file") from None
        raise UserError(f"{source}: could not load Hub dataset {name!r} split {split!r} "
                        f"({_one_line(err)}); if it is a local file, check the path") from None
    return [Row(record, f"{source} row {i}") for i, record in enumerate(table.to_list(), 1)]


def _one_line(err: BaseException, limit: int = 200) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[:limit] + "..."


# ---------------------------------------------------------------------------------------------
# Formats: validate a row and turn it into messages or raw text.

def detect_format(record: dict, where: str) -> str:
    """The format whose fields the record has: chat, alpaca, prompt_completion or text."""
    # Columnar files (json/csv/parquet) give every row every column, absent ones as None.
    present = {key for key, value in record.items() if value is not None}
    for fmt, fields in FORMAT_FIELDS.items():
        if present.issuperset(fields):
            return fmt
    options = "; ".join(f"{fmt} = {EXPECTED[fmt]}" for fmt in FORMAT_FIELDS)
    raise UserError(f"{where}: cannot tell the data format from the fields "
                    f"{sorted(present)}; expected one of: {options} (or set data.format)")


def _field(record: dict, key: str, fmt: str, where: str, optional: bool = False) -> str:
    value = record.get(key)
    if value is None and optional:
        return ""
    if value is None:
        raise BadRow(f"{where}: missing {key!r}; expected {EXPECTED[fmt]}")
    if not isinstance(value, str):
        raise BadRow(f"{where}: {key!r} is a {type(value).__name__}, not a string; "
                     f"expected {EXPECTED[fmt]}")
    return value


def _chat_messages(record: dict, where: str) -> list[dict]:
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        problem = "'messages' is missing, empty or not a list"
        raise BadRow(f"{where}: {problem}; expected {EXPECTED['chat']}")
    clean = []
    for n, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if role not in ROLES or not isinstance(content, str):
            shown = json.dumps(message, ensure_ascii=False, default=str)[:80]
            raise BadRow(f"{where}: messages[{n}] = {shown} is not a valid message; "
                         f"expected {EXPECTED['chat']}")
        # Keep only role and content: columnar files add absent keys (e.g. "name": None)
        # that a chat template would otherwise render.
        clean.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in clean):
        raise BadRow(f"{where}: no assistant turn to learn from; expected {EXPECTED['chat']}")
    return clean


def to_messages(record: dict, fmt: str, where: str,
                system_prompt: str = "") -> list[dict] | None:
    """Chat messages of a chat or alpaca row (validated); None for the raw formats."""
    if fmt == "chat":
        messages = _chat_messages(record, where)
    elif fmt == "alpaca":
        instruction = _field(record, "instruction", fmt, where)
        extra = _field(record, "input", fmt, where, optional=True)
        output = _field(record, "output", fmt, where)
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    elif fmt in ("prompt_completion", "text"):
        return None
    else:
        raise UserError(f"data.format={fmt!r}: must be one of {', '.join(FORMAT_FIELDS)}")
    # A conversation that brings its own system message keeps it.
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}] + messages
    return messages


# ---------------------------------------------------------------------------------------------
# Rendering: a row -> text pieces (prompt / completion).

def _name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def _require_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"tokenizer {_name(tokenizer)} has no chat template, needed for chat "
                        f"and alpaca data; use an instruct model's tokenizer, set "
                        f"tokenizer.chat_template, or use format=prompt_completion/text")


def _require_prefix(text: str, prefix: str, tokenizer, where: str) -> None:
    if not text.startswith(prefix):
        raise UserError(f"the chat template of {_name(tokenizer)} is not prefix-stable "
                        f"(rendering more turns changes the text of earlier ones, {where}), "
                        f"so assistant turns cannot be located; use a template without "
                        f"that behaviour or format=prompt_completion")


def _render(tokenizer, messages: list[dict], generation_prompt: bool, where: str) -> str:
    _require_chat_template(tokenizer)
    import jinja2  # transformers renders chat templates with jinja2

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except jinja2.TemplateError as err:  # the template's raise_exception(), e.g. role order
        raise BadRow(f"{where}: the chat template of {_name(tokenizer)} rejected this "
                     f"conversation ({_one_line(err)}); fix the row") from None


def _chat_pieces(messages: list[dict], tokenizer, where: str) -> list[Piece]:
    """Split a rendered conversation into prompt and completion pieces, one pair per
    assistant turn, by rendering it progressively (prompt = turns before it plus the
    generation prompt, completion = what the assistant turn adds to that)."""
    eos = tokenizer.eos_token
    pieces, done = [], ""  # done = the text already assigned to pieces
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], True, where)
        full = _render(tokenizer, messages[: i + 1], False, where)
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
        rest = _render(tokenizer, messages, False, where)
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


def _sample(record: dict, fmt: str, tokenizer, cfg: Data,
            where: str) -> tuple[list[Piece], str | None]:
    """A row as text pieces, plus the reference answer for generation eval (None for text)."""
    if fmt == "text":
        return [Piece(_raw_bos(tokenizer) + _field(record, "text", fmt, where), True)], None
    if fmt == "prompt_completion":
        prompt = _field(record, "prompt", fmt, where)
        completion = _field(record, "completion", fmt, where)
        pieces = [Piece(_raw_bos(tokenizer) + prompt, False), Piece(completion, True)]
        return pieces, completion.strip()
    messages = to_messages(record, fmt, where, cfg.system_prompt)
    reference = [m["content"] for m in messages if m["role"] == "assistant"][-1]
    return _chat_pieces(messages, tokenizer, where), reference.strip()


# ---------------------------------------------------------------------------------------------
# Tokenizing: pieces -> input_ids and labels.

def _tokenize(tokenizer, samples: list[list[Piece]]) -> list[list[list[int]]]:
    """Token ids of every piece of every sample, in one batched tokenizer call."""
    texts = [piece.text for pieces in samples for piece in pieces]
    flat = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else []
    out, start = [], 0
    for pieces in samples:
        out.append(flat[start:start + len(pieces)])
        start += len(pieces)
    return out


def _assemble(pieces: list[Piece], ids: list[list[int]], eos_id: int,
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


def _prompt_ids(pieces: list[Piece], ids: list[list[int]]) -> list[int]:
    """The tokens before the last completion: the prompt exactly as training saw it."""
    last = max(i for i, piece in enumerate(pieces) if piece.completion)
    return [token for piece_ids in ids[:last] for token in piece_ids]


def tokenize_record(record: dict, fmt: str, tokenizer, cfg: Data,
                    where: str) -> Example | None:
    """One row as a training example; None if truncation left no token with a loss."""
    pieces, _ = _sample(record, fmt, tokenizer, cfg, where)
    example, _ = _assemble(pieces, _tokenize(tokenizer, [pieces])[0],
                           tokenizer.eos_token_id, cfg)
    return example


def prompt_of(record: dict, fmt: str, tokenizer, cfg: Data, where: str) -> Prompt | None:
    """The prompt for the row's last answer and that answer as reference; None for text.

    The prompt is not truncated: generation needs all of it."""
    pieces, reference = _sample(record, fmt, tokenizer, cfg, where)
    if reference is None:
        return None
    return Prompt(_prompt_ids(pieces, _tokenize(tokenizer, [pieces])[0]), reference)


# ---------------------------------------------------------------------------------------------
# Building the train / eval sets.

def _check_tokenizer(tokenizer, fmt: str) -> None:
    name = _name(tokenizer)
    if tokenizer.eos_token_id is None:
        raise UserError(f"tokenizer {name} has no EOS token; set one, the model must learn "
                        f"to stop")
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise UserError(f"tokenizer {name}: the pad token must be set and differ from EOS "
                        f"(id {tokenizer.eos_token_id}), or EOS would be masked as padding "
                        f"and never learned; add a dedicated pad token")
    if fmt in ("chat", "alpaca"):
        _require_chat_template(tokenizer)


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
            pieces, reference = _sample(row, fmt, tokenizer, cfg, where)
        except BadRow:
            if not cfg.skip_bad_rows:
                raise
            stats.skipped += 1
            continue
        samples.append(pieces)
        references.append(reference)
    stats.rows = len(samples)
    examples, prompts = [], []
    for pieces, ids, reference in zip(samples, _tokenize(tokenizer, samples), references):
        example, truncated = _assemble(pieces, ids, tokenizer.eos_token_id, cfg)
        stats.truncated += truncated
        if example is None:
            stats.dropped_no_labels += 1
        else:
            examples.append(example)
            stats.tokens += len(example.input_ids)
            stats.loss_tokens += sum(label != IGNORE for label in example.labels)
        if want_prompts and reference is not None:
            prompts.append(Prompt(_prompt_ids(pieces, ids), reference))
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
    _check_tokenizer(tokenizer, fmt)
    if cfg.eval:
        eval_rows, _ = load_records(cfg.eval, cfg.skip_bad_rows)
        eval_fmt = _format_of(eval_rows, cfg)
        _check_tokenizer(tokenizer, eval_fmt)
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
    _check_tokenizer(tokenizer, fmt)
    examples, prompts, _ = _encode_rows(rows, fmt, tokenizer, cfg, want_prompts=True)
    return examples, prompts
