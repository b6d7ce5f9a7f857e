"""Figures from one benchmark run: each chart is described once as data (chart_specs), then drawn
as a matplotlib PNG in figures/ and as a panel of one interactive Plotly page. Reads the per-
configuration medians and the report that benchmarks/report.py built; measures nothing."""

from pathlib import Path

MODE_COLORS = {"fp32": "#1f77b4", "fp16": "#ff7f0e", "bf16": "#2ca02c", "int8": "#d62728", "nf4": "#9467bd",
               "fp4": "#8c564b", "w8": "#e377c2", "w4": "#7f7f7f"}
# summary table: (heading, report key with {top} for the largest context, higher is better)
TABLE_COLUMNS = (("weights GB", "weights_gb", False), ("prefill ms @{top}", "prefill_ms_{top}", False),
                 ("tok/s @{top}", "tokens_s_{top}", True), ("tok/s no KV @{top}", "tokens_s_no_cache_{top}", True),
                 ("peak GB @{top}", "mem_gb_{top}", False), ("ppl", "ppl", False), ("ppl +%", "ppl_degradation_pct", False))


def curve(summary: list[dict], mode: str, kv_cache: bool, key: str, label: str, dash: bool = False) -> dict:
    points = sorted((s["context_len"], s[key]) for s in summary if s["mode"] == mode and s["kv_cache"] == kv_cache)
    return {"label": label, "x": [p[0] for p in points], "y": [p[1] for p in points], "color": MODE_COLORS[mode],
            "dash": dash}


def chart_specs(summary: list[dict], report: dict) -> list[dict]:
    modes = [m for m in MODE_COLORS if m in report]
    ppl_modes = [m for m in modes if report[m]["ppl_degradation_pct"] is not None]
    lines = dict(kind="line", xlabel="prompt tokens")
    return [
        dict(lines, name="prefill_vs_decode", title="Prefill (to first token) vs decode (tokens 2..N), KV cache on",
             ylabel="ms (log)", logy=True,
             traces=[c for m in modes for c in (curve(summary, m, True, "prefill_ms", f"{m} prefill"),
                                                curve(summary, m, True, "decode_ms", f"{m} decode", dash=True))]),
        dict(lines, name="tokens_per_s", title="Decode tokens/s vs context length, KV cache on",
             ylabel="tokens/s", logy=False, traces=[curve(summary, m, True, "decode_tokens_s", m) for m in modes]),
        dict(lines, name="memory", title=f"Peak memory per context length ({report['memory']})",
             ylabel="MiB", logy=False, traces=[curve(summary, m, True, "peak_mem_mb", m) for m in modes]),
        dict(kind="bar", name="ppl_degradation", xlabel="mode", logy=False,
             title=f"Perplexity increase vs {report['baseline_mode']} (WikiText-2 test)" if ppl_modes
             else "Perplexity: not measured (random weights)", ylabel="% over baseline",
             traces=[{"label": "ppl +%", "x": ppl_modes, "y": [report[m]["ppl_degradation_pct"] for m in ppl_modes],
                      "color": [MODE_COLORS[m] for m in ppl_modes], "dash": False}]),
        dict(lines, name="kv_cache", title="Total latency with (solid) and without (dashed) the KV cache",
             ylabel="ms (log)", logy=True,
             traces=[c for m in modes for c in (curve(summary, m, True, "total_ms", f"{m} KV cache"),
                                                curve(summary, m, False, "total_ms", f"{m} no cache", dash=True))]),
    ]


def table_cells(report: dict) -> tuple[list[str], list[list[str]], list[list[str]]]:
    """Headings, text rows and colour rows: per column, green is best and red worst."""
    from matplotlib import colormaps, colors

    top = max(report["grid"]["context_lengths"])
    modes = [m for m in MODE_COLORS if m in report]
    headings = ["mode"] + [h.format(top=top) for h, _, _ in TABLE_COLUMNS]
    text = [[m] for m in modes]
    fill = [["#ffffff"] for _ in modes]
    for _, key, higher_is_better in TABLE_COLUMNS:
        values = [report[m].get(key.format(top=top)) for m in modes]
        known = [v for v in values if v is not None]
        lo, hi = (min(known), max(known)) if known else (0, 0)
        for row, v in enumerate(values):
            text[row].append("-" if v is None else f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}")
            score = 0.5 if v is None or hi == lo else (v - lo) / (hi - lo)
            score = score if higher_is_better else 1 - score
            fill[row].append("#dddddd" if v is None else colors.to_hex(colormaps["RdYlGn"](0.15 + 0.7 * score)))
    if not modes:   # every mode was skipped: say so rather than draw an empty table
        text, fill = [["none ran"] + ["-"] * len(TABLE_COLUMNS)], [["#dddddd"] * (len(TABLE_COLUMNS) + 1)]
    return headings, text, fill


def pyplot():
    """pyplot on the Agg backend (files, no display), imported on first use: the bench's workers never load it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)


def draw_png(spec: dict, path: Path) -> None:
    fig, ax = pyplot().subplots(figsize=(8, 5))
    for t in spec["traces"]:
        if spec["kind"] == "bar":
            bars = ax.bar(t["x"], t["y"], color=t["color"])
            ax.bar_label(bars, fmt="%.2f")
        else:
            ax.plot(t["x"], t["y"], marker="o", color=t["color"], linestyle="--" if t["dash"] else "-", label=t["label"])
    if spec["kind"] == "line":
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({x for t in spec["traces"] for x in t["x"]}), labels=None)
        ax.get_xaxis().set_major_formatter("{x:.0f}")
        ax.legend(fontsize=8, ncol=2)
    if spec["logy"]:
        ax.set_yscale("log")
    ax.set(title=spec["title"], xlabel=spec["xlabel"], ylabel=spec["ylabel"])
    ax.grid(alpha=0.3, which="both")
    save(fig, path)


def draw_table_png(report: dict, path: Path) -> None:
    headings, text, fill = table_cells(report)
    fig, ax = pyplot().subplots(figsize=(11, 0.5 + 0.45 * (len(text) + 1)))
    ax.axis("off")
    table = ax.table(cellText=text, cellColours=fill, colLabels=headings, loc="center", cellLoc="center")
    table.scale(1, 1.4)
    ax.set_title(f"Summary: {report['model']} on {report['device']} ({report['profile']} profile)", fontsize=9)
    save(fig, path)


def write_html(specs: list[dict], report: dict, path: Path) -> None:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=3, cols=2, subplot_titles=[s["title"] for s in specs] + ["Summary"],
                        specs=[[{}, {}], [{}, {}], [{}, {"type": "table"}]], vertical_spacing=0.08)
    seen = set()
    for i, spec in enumerate(specs):
        row, col = i // 2 + 1, i % 2 + 1
        for t in spec["traces"]:
            if spec["kind"] == "bar":
                fig.add_trace(go.Bar(x=t["x"], y=t["y"], marker_color=t["color"], name=t["label"]), row, col)
                continue
            fig.add_trace(go.Scatter(x=t["x"], y=t["y"], name=t["label"], legendgroup=t["label"],
                                     showlegend=t["label"] not in seen, mode="lines+markers",
                                     line=dict(color=t["color"], dash="dash" if t["dash"] else "solid")), row, col)
            seen.add(t["label"])
        fig.update_xaxes(title_text=spec["xlabel"], type="log" if spec["kind"] == "line" else None, row=row, col=col)
        fig.update_yaxes(title_text=spec["ylabel"], type="log" if spec["logy"] else "linear", row=row, col=col)
    headings, text, fill = table_cells(report)
    fig.add_trace(go.Table(header=dict(values=headings), cells=dict(values=list(zip(*text)), fill_color=list(zip(*fill)))),
                  3, 2)
    fig.update_layout(height=1400, title=f"{report['model']} on {report['device']}: {report['profile']} profile, "
                                         f"{report['machine']['date']}")
    fig.write_html(path, include_plotlyjs="cdn")


def write_figures(summary: list[dict], report: dict, figures_dir: Path, html_path: Path) -> list[Path]:
    """One PNG per chart, the summary table PNG and the HTML page in figures_dir (which exists); their paths."""
    specs = chart_specs(summary, report)
    paths = [figures_dir / f"{spec['name']}.png" for spec in specs] + [figures_dir / "summary_table.png"]
    for spec, path in zip(specs, paths):
        draw_png(spec, path)
    draw_table_png(report, paths[-1])
    write_html(specs, report, html_path)
    return paths + [html_path]
