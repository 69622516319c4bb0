"""Training data: sources, formats, rendering and masking, batching and packing.

    sources.py   where rows come from: files, shipped `peftkit:` assets, Hub datasets
    formats.py   the data formats: how each is detected and what a row of it becomes
    tools.py     tool calls and results in conversations; whether a chat template renders them
    render.py    a row -> text pieces -> tokens, loss masked to the completion
    example.py   what a row becomes: Example (tokens + labels), Prompt; IGNORE
    mixing.py    one epoch of a mix of sources (data.train="a.jsonl=0.7, b.jsonl=0.3")
    dataset.py   the train / eval sets of a recipe: `build`, `build_eval`
    batching.py  batch order and collation;  packing.py  padding-free batches
    preflight.py `peftkit show NAME --data`
"""
