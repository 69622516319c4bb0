"""The base model: sources, loading, precision, quantization, tiny offline stand-ins."""
