"""Training data: sources, formats, rendering and masking, batching and packing."""
