"""Where training rows come from: a local .jsonl/.json/.csv/.parquet file, `peftkit:<path>` (a
file shipped under peftkit/assets/) or a Hub dataset id. Every row remembers where it came from
("train.jsonl:12") so that errors can point at it.
"""

from __future__ import annotations

import csv
import importlib.resources
import json
import os
from pathlib import Path

from peftkit.errors import UserError
from peftkit.offline import go_offline_if_unreachable

FILE_TYPES = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
ASSET_PREFIX = "peftkit:"


class Row(dict):
    """A record plus where it came from ("train.jsonl:12"), so errors can point at it."""

    def __init__(self, record: dict, where: str):
        super().__init__(record)
        self.where = where


class BadRow(UserError):
    """A problem with one row: skipped (and counted) instead when data.skip_bad_rows is set."""


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
        raise UserError(f"{path}: cannot read the file ({one_line(err)}); check its "
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
                        f"{one_line(cause)}); fix the file or convert it to .jsonl") from None
    return [Row(record, f"{path} row {i}") for i, record in enumerate(table.to_list(), 1)]


def _read_hub(source: str) -> list[Row]:
    """`owner/name` (split "train") or `owner/name:split` from the Hugging Face Hub."""
    import datasets
    from huggingface_hub import constants

    name, _, split = source.partition(":")
    split = split or "train"
    go_offline_if_unreachable()
    try:
        table = datasets.load_dataset(name, split=split)
    except Exception as err:
        if constants.HF_HUB_OFFLINE or isinstance(err, ConnectionError):
            raise UserError(f"{source}: not a local file, and the Hugging Face Hub is "
                            f"unreachable (offline); download the dataset where the Hub is "
                            f"reachable and point data.train/data.eval at a local "
                            f"{'/'.join(FILE_TYPES)} file") from None
        raise UserError(f"{source}: could not load Hub dataset {name!r} split {split!r} "
                        f"({one_line(err)}); if it is a local file, check the path") from None
    return [Row(record, f"{source} row {i}") for i, record in enumerate(table.to_list(), 1)]


def one_line(err: BaseException, limit: int = 200) -> str:
    """An error as one line of at most `limit` characters, to quote inside a message."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[:limit] + "..."
