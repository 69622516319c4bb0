"""Training data: sources, formats, rendering and masking, batching and packing.

    sources.py   where rows come from: files, shipped `peftkit:` assets, Hub datasets
    formats.py   the data formats: how each is detected and what a row of it becomes
    render.py    a row -> text pieces -> tokens, loss masked to the completion
    example.py   what a row becomes: Example (tokens + labels), Prompt; IGNORE
    dataset.py   the train / eval sets of a recipe: `build`, `build_eval`
    batching.py  batch order and collation;  packing.py  padding-free batches
    preflight.py `peftkit show NAME --data`
"""
