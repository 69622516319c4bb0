"""`data.train`: one source, or several mixed with weights. The syntax, parsed and validated.

    data.train="train.jsonl"                                  one source (as always)
    data.train="a.jsonl=0.7, b.parquet=0.2, owner/name:train=0.1"   shares of the mix, sum 1
    data.train="a.jsonl=2x, b.jsonl=0.5x, c.jsonl"            passes over each source (1x)

A share says what part of the mix's samples a source supplies; the mix has as many samples as
the sources have rows together, so a small source with a large share repeats its rows and a
large one with a small share gives a seeded subset. Passes say how often each of a source's
rows appears: 2x every row twice, 0.5x a seeded half. Sources without a weight count once,
which makes "a.jsonl, b.jsonl" their concatenation. peftkit.data.mixing draws the samples.

A weight follows the last "=" of an entry. A file whose name holds "," or "=" can still be
data.train on its own (an existing file is always read as one source), not part of a mix.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from peftkit.errors import ConfigError


@dataclass(frozen=True)
class TrainSource:
    source: str  # a file, peftkit:<asset> or a Hub id (owner/name[:split])
    share: float | None = None  # part of the mix's samples (all shares sum to 1)
    passes: float | None = None  # times each row appears (epochs over this source)

    @property
    def weight(self) -> str:
        """The weight as written in data.train ("0.7", "2x"); "" for none."""
        if self.share is not None:
            return f"{self.share:g}"
        return f"{self.passes:g}x" if self.passes is not None else ""


def _weight(entry: str, text: str) -> tuple[float | None, float | None, str]:
    """(share, passes, problem) of a weight's text."""
    is_passes = text.lower().endswith("x")
    try:
        value = float(text[:-1] if is_passes else text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        return None, None, (f"{entry!r}: the weight {text!r} is neither a share of the mix "
                            f"(0.3) nor a number of passes (2x)")
    if is_passes:
        ok = value > 0
        return None, value, "" if ok else f"{entry!r}: passes must be > 0"
    ok = 0 < value <= 1
    return value, None, "" if ok else (f"{entry!r}: a share must be > 0 and <= 1 (for more "
                                       f"passes over a source write {text}x)")


def _entry(entry: str) -> tuple[TrainSource, str]:
    source, equals, weight = entry.rpartition("=")
    if not equals or "/" in weight:  # no weight, or "=" inside a path (dir/key=value/f.jsonl)
        return TrainSource(entry), ""
    share, passes, problem = _weight(entry, weight.strip())
    if not source.strip():
        problem = f"{entry!r}: a weight without a source"
    return TrainSource(source.strip(), share, passes), problem


def parse_train(text: str) -> tuple[list[TrainSource], list[str]]:
    """data.train as its sources, and every problem with it (each naming data.train)."""
    if not text.strip():
        return [], ["data.train: empty; name a data file or Hub dataset id"]
    if os.path.isfile(os.path.expanduser(text)):  # any existing file is one source, as is
        return [TrainSource(text)], []
    sources, problems = [], []
    for n, entry in enumerate(text.split(","), 1):
        if not entry.strip():
            problems.append(f"data.train: source {n} of {text!r} is empty; separate sources "
                            f"with single commas")
            continue
        source, problem = _entry(entry.strip())
        sources.append(source)
        if problem:
            problems.append(f"data.train: {problem}")
    if not problems:
        problems += _mix_problems(sources)
    return sources, problems


def _mix_problems(sources: list[TrainSource]) -> list[str]:
    problems = []
    names = [s.source for s in sources]
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"data.train: {name!r} is named twice; give it one weight (a share, "
                        f"or passes such as 2x)")
    shared = [s for s in sources if s.share is not None]
    if not shared:
        return problems
    if len(shared) < len(sources):
        others = ", ".join(repr(s.source + (f"={s.weight}" if s.weight else ""))
                           for s in sources if s.share is None)
        problems.append(f"data.train: {others}: no share, while other sources have one; give "
                        f"every source a share (they sum to 1, e.g. a.jsonl=0.7, b.jsonl=0.3) "
                        f"or every source passes (a.jsonl=2x, b.jsonl=1x)")
    elif not math.isclose(total := sum(s.share for s in shared), 1, abs_tol=1e-6):
        problems.append(f"data.train: the shares sum to {total:g}, not 1; each is the part of "
                        f"the mix its source supplies (for passes over a source write 2x)")
    return problems


def train_sources(text: str) -> list[TrainSource]:
    """The sources of a data.train that validation accepted."""
    sources, problems = parse_train(text)
    if problems:  # validation reports these first; only a recipe that skipped it gets here
        raise ConfigError(problems)
    return sources


def eval_problems(text: str) -> list[str]:
    """data.eval is one source: mixing is for training data."""
    if not text or os.path.isfile(os.path.expanduser(text)):
        return []
    sources, _ = parse_train(text)
    if len(sources) > 1 or any(s.weight for s in sources):
        return [f"data.eval={text!r}: one source, without a weight (mixing applies to "
                "data.train)"]
    return []
