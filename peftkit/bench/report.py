"""How `peftkit bench` results read: a terminal table, a small plot, and markdown rows."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

GB = 1024 ** 3
ROWS = (  # (label, key, format)
    ("useful tokens/s", "tokens_per_s", "{:,.0f}"),
    ("samples/s", "samples_per_s", "{:.2f}"),
    ("step time (s, mean)", "step_seconds_mean", "{:.2f}"),
    ("first step (s, untimed)", "first_step_seconds", "{:.1f}"),
    ("reference pass (s, DPO)", "reference_seconds", "{:.2f}"),
    ("peak memory (GB)", "peak_memory_bytes", "gb"),
    ("page faults (CPU, minor)", "page_faults", "{:,}"),
    ("padding share", "padding_share", "{:.0%}"),
    ("MFU", "mfu", "{:.1%}"),
    ("trainable params", "trainable", "{:,}"),
    ("total params", "total", "{:,}"),
    ("mean loss", "mean_loss", "{:.4f}"),
    ("final loss", "final_loss", "{:.4f}"),
    ("loss, identical batch", "reference_loss", "{:.5f}"),
    ("loss, identical batch, adapter on", "adapter_loss", "{:.5f}"),
)


def _cell(value, fmt: str) -> str:
    if value is None:
        return "-"
    if fmt == "gb":
        return f"{value / GB:.2f}"
    return fmt.format(value)


def table(result: dict) -> Table:
    sides = result["sides"]
    out = Table(title=f"peftkit bench {result['recipe']}: {result['steps']} steps, "
                      f"{result['samples']} samples, {result['tokens']:,} tokens",
                title_justify="left")
    out.add_column("")
    for name in sides:
        out.add_column(name, justify="right")
    ratios = result.get("ratios", {})
    for name in ratios:
        out.add_column(f"peftkit / {name}", justify="right")
    for label, key, fmt in ROWS:
        cells = [_cell(s.get(key), fmt) for s in sides.values()]
        for name in ratios:
            which = {"tokens_per_s": "tokens_per_s", "peak_memory_bytes": "peak_memory"}
            cells.append(ratio_cell(ratios[name], which[key]) if key in which else "-")
        out.add_row(label, *cells)
    return out


def ratio_cell(ratio: dict, key: str) -> str:
    """`2.10x`, or over several runs `2.10x (1.95-2.30)`: median (min-max)."""
    if ratio.get(key) is None:
        return "-"
    spread = (ratio.get("spread") or {}).get(key)
    if not spread or len(spread["runs"]) < 2:
        return f"{ratio[key]:.2f}x"
    return f"{spread['median']:.2f}x ({spread['min']:.2f}-{spread['max']:.2f})"


def footer(result: dict) -> list[str]:
    env = result["environment"]
    lines = [f"device: {env['device']}, {env['threads']} threads; matmul peak "
             f"{result['matmul_peak']['flops'] / 1e9:,.0f} GFLOP/s (measured in this run); "
             f"{result['flops_per_token'] / 1e6:,.1f} MFLOP per token; sides: "
             f"{result['isolation']}"]
    loads = ", ".join(f"{n} {s['loadavg_before'][0]:.2f}" for n, s in result["sides"].items())
    lines.append(f"1-min load average before each side: {loads}")
    if result.get("repeat", 1) > 1:
        lines.append(f"{result['repeat']} runs of every side, alternating: each side's median "
                     "run is shown; ratios are median (min-max) of the per-run ratios")
    refs = {n: s["reference_seconds"] for n, s in result["sides"].items()
            if s.get("reference_seconds")}
    if refs:
        lines.append("DPO reference pass (adapter off, every pair once, before step 1 on every "
                     "side; not in the steps' tokens/s): " + ", ".join(
                         f"{n} {v:.2f} s ({result['sides'][n]['reference_share']:.0%} of its "
                         "training time)" for n, v in refs.items()))
    eq = result["equal_work"]
    if eq["problems"]:
        lines += [f"NOT the same work: {p}" for p in eq["problems"]]
    elif len(result["sides"]) > 1:
        lines.append(f"same work: the same {result['samples']} samples and {result['tokens']:,} "
                     "tokens on every side; on an identical batch the same loss (adapter off "
                     f"and on, within {eq['rtol']:g}) and adapter gradients (within "
                     f"{eq['gradient_rtol']:g})")
    if eq.get("info"):
        ours = result["sides"]["peftkit"]
        for key, label in (("mean_loss", "mean"), ("final_loss", "final")):
            others = ", ".join(f"{name} {i[key]:.4f} ({i[key + '_vs_peftkit']:+.1%})"
                               for name, i in eq["info"].items())
            lines.append(f"training order (not compared, the sides shuffle differently): "
                         f"{label} loss peftkit {ours[key]:.4f}, {others}")
    return lines


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["sides"])
    sides = [result["sides"][n] for n in names]
    fig, axes = plt.subplots(1, 3, figsize=(10, 3))
    for ax, key, title, scale in ((axes[0], "tokens_per_s", "useful tokens/s", 1),
                                  (axes[1], "peak_memory_bytes", "peak memory (GB)", GB),
                                  (axes[2], "mfu", "MFU (%)", 0.01)):
        ax.bar(names, [(s[key] or 0) / scale for s in sides],
               color=["tab:green"] + ["tab:gray"] * (len(names) - 1))
        ax.set_title(title)
        ax.tick_params(axis="x", labelrotation=20)
    fig.suptitle(f"peftkit bench {result['recipe']}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def markdown(results: list[dict]) -> str:
    """One row per benchmark: the table of README.md (sides missing from a result show -)."""
    lines = ["| benchmark | tokens/s: peftkit | Trainer | Trainer grouped | TRL "
             "| speed-up vs Trainer / grouped | speed-up vs TRL "
             "| peak memory GB: peftkit | Trainer | TRL "
             "| MFU: peftkit | Trainer | mean loss: peftkit | Trainer | load |",
             "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in results:
        sides = r["sides"]
        ours, hf, grouped, trl = (sides["peftkit"], sides.get("hf"), sides.get("hf-grouped"),
                                  sides.get("trl"))

        def get(side, key, fmt):
            return "-" if side is None or side.get(key) is None else _cell(side[key], fmt)

        speedups = " / ".join(f"{ours['tokens_per_s'] / s['tokens_per_s']:.2f}x"
                              for s in (hf, grouped) if s)
        versus_trl = ratio_cell(r["ratios"]["trl"], "tokens_per_s") \
            if "trl" in r.get("ratios", {}) else "-"
        loads = max(s["loadavg_before"][0] for s in sides.values())
        lines.append(" | ".join([
            f"| {r.get('label', r['recipe'])}", get(ours, "tokens_per_s", "{:,.0f}"),
            get(hf, "tokens_per_s", "{:,.0f}"), get(grouped, "tokens_per_s", "{:,.0f}"),
            get(trl, "tokens_per_s", "{:,.0f}"), speedups or "-", versus_trl,
            get(ours, "peak_memory_bytes", "gb"), get(hf, "peak_memory_bytes", "gb"),
            get(trl, "peak_memory_bytes", "gb"), get(ours, "mfu", "{:.0%}"),
            get(hf, "mfu", "{:.0%}"), get(ours, "mean_loss", "{:.3f}"),
            get(hf, "mean_loss", "{:.3f}"), f"{loads:.1f} |"]))
    return "\n".join(lines)
