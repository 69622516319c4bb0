"""Peak memory of `peftkit merge` (docs/merge-and-publishing.md, "Merge"), measured in a fresh process per merge.

    python scripts/merge_memory.py --hidden 1024 --layers 16 [--quantize nf4] [--work DIR]

Builds a random-weight Llama of that shape with peftkit's tokenizer (float32), trains its
adapter for one step on the demo data, then merges it in a fresh process and prints one JSON
line: the RSS after importing the libraries, the peak RSS of the merge and its anonymous and
file-backed (memory-mapped checkpoint) parts, and the size of the merged weights.
"""

import argparse
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def build(hidden: int, layers: int, out: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from peftkit.model.tiny import tokenizer_dir

    tok = AutoTokenizer.from_pretrained(tokenizer_dir())
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=int(hidden * 2.75) // 64 * 64,
        num_hidden_layers=layers, num_attention_heads=hidden // 64,
        num_key_value_heads=max(1, hidden // 128), head_dim=64, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)


def measure(run: str, out: str) -> None:
    """In this (fresh) process: merge `run` and print the memory figures."""
    import peft  # noqa: F401  - the libraries a merge needs, for the baseline
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from peftkit.export.merge import merge_run

    peak = {"anon": 0, "file": 0, "rss": 0}

    def sample():
        while True:
            status = Path("/proc/self/status").read_text()
            anon, file = (int(re.search(rf"{k}:\s+(\d+)", status).group(1)) * 1024
                          for k in ("RssAnon", "RssFile"))
            if anon + file > peak["rss"]:
                peak.update(rss=anon + file, anon=anon, file=file)
            time.sleep(0.005)

    baseline = None
    threading.Thread(target=sample, daemon=True).start()
    time.sleep(0.05)
    baseline = dict(peak)
    report = merge_run(run, out, overwrite=True, say=lambda line: None)
    time.sleep(0.05)
    weights = sum(f.stat().st_size for f in Path(out).glob("*.safetensors"))
    mb = 2 ** 20
    print(json.dumps({
        "dtype": report["dtype"], "dequantized_from": report["dequantized_from"],
        "ok": report["ok"], "merged_weights_mb": round(weights / mb),
        "baseline_rss_mb": round(baseline["rss"] / mb), "peak_rss_mb": round(peak["rss"] / mb),
        "peak_anon_above_baseline_mb": round((peak["anon"] - baseline["anon"]) / mb),
        "peak_file_mb": round(peak["file"] / mb),
        "rss_above_baseline_over_weights": round((peak["rss"] - baseline["rss"]) / weights, 2),
        "seconds": report["seconds"]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--quantize", default="none", choices=("none", "nf4", "int8"))
    parser.add_argument("--work", default="")
    parser.add_argument("--measure", nargs=2, metavar=("RUN", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        return measure(*args.measure)
    work = Path(args.work or tempfile.mkdtemp(prefix="peftkit-merge-memory-"))
    base = work / f"llama-{args.hidden}x{args.layers}"
    if not (base / "config.json").is_file():
        build(args.hidden, args.layers, base)
    name = f"{base.name}-{args.quantize}"
    subprocess.run([sys.executable, "-m", "peftkit", "train", "tiny-demo", f"name={name}",
                    f"model.name={base}", "model.tiny=false", "model.arch=llama",
                    f"model.quantize={args.quantize}", "train.max_steps=1",
                    "train.warmup_steps=0", "train.batch_size=2", "data.max_samples=8",
                    "data.eval=", "data.eval_size=8", "train.eval_generate=0",
                    "train.save_every=0", "train.eval_every=0", f"train.output_dir={work}",
                    "--overwrite"], check=True, capture_output=True)
    subprocess.run([sys.executable, __file__, "--measure", str(work / name),
                    str(work / f"{name}-merged")], check=True)


if __name__ == "__main__":
    main()
