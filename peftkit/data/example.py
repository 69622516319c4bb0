"""What a data row becomes: an `Example` to train on and, for generation eval, a `Prompt`."""

from __future__ import annotations

from dataclasses import dataclass

IGNORE = -100  # label of a token that carries no loss (the value torch's cross_entropy skips)


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss; same length as input_ids


@dataclass
class Prompt:
    """A held-out prompt for generation-based eval (exact match)."""

    input_ids: list[int]  # the rendered prompt up to and including the generation prompt
    reference: str  # the expected completion text, stripped
