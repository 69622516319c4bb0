"""peftkit: parameter-efficient fine-tuning of LLMs, by recipe."""

__version__ = "0.1.0"
