"""Published architecture shapes of the models the shipped recipes name.

Used when the Hub cannot be reached: `peftkit show` counts parameters of the real model on the
meta device (no memory, no download), and benchmarks build realistic random-weight models.
Values are copied from each model's config.json on the Hub.
"""

from __future__ import annotations

KNOWN_SHAPES: dict[str, dict] = {
    "meta-llama/Llama-3.1-8B-Instruct": dict(
        model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
        max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=False),
    "meta-llama/Llama-3.2-1B-Instruct": dict(
        model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, head_dim=64,
        max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=True),
    "Qwen/Qwen2.5-7B-Instruct": dict(
        model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
        max_position_embeddings=32768, rope_theta=1000000.0, tie_word_embeddings=False),
    "mistralai/Mistral-7B-Instruct-v0.3": dict(
        model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=32768,
        max_position_embeddings=32768, rope_theta=1000000.0, tie_word_embeddings=False),
}


def known_config(name: str):
    """A transformers config for a model in the table, or None."""
    shape = KNOWN_SHAPES.get(name)
    if shape is None:
        return None
    from transformers import AutoConfig

    shape = dict(shape)
    return AutoConfig.for_model(shape.pop("model_type"), **shape)
