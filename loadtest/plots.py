"""The sweep's PNG plots: throughput vs batch size, latency percentiles vs batch size, and a
latency histogram per configuration. One line per (model label, max batch delay)."""

import math
from pathlib import Path

from benchmarks.plots import pyplot, save

PERCENTILES = (("latency_p50_ms", "-", "o"), ("latency_p95_ms", "--", "s"), ("latency_p99_ms", ":", "^"))


def series(rows: list[dict]) -> dict[str, list[dict]]:
    """Rows grouped by model label and delay, sorted by batch size. Batch size 1 runs once per
    label (no delay matters when one request fills the batch), so it joins each of its lines."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["label"], r["max_batch_delay_ms"]), []).append(r)
    for (label, _), members in groups.items():
        if not any(m["batch_size"] == 1 for m in members):
            members += [r for r in rows if r["label"] == label and r["batch_size"] == 1]
        members.sort(key=lambda r: r["batch_size"])
    return {f"{label}, delay {delay} ms": members for (label, delay), members in groups.items()}


def batch_axis(ax, rows: list[dict], ylabel: str) -> None:
    sizes = sorted({r["batch_size"] for r in rows})
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.set(xlabel="server batch size (batchSize)", ylabel=ylabel, ylim=(0, None))
    ax.grid(True, alpha=0.3)


def plot_throughput(rows: list[dict], path: Path) -> None:
    fig, (ax_req, ax_tok) = pyplot().subplots(1, 2, figsize=(11, 4))
    for label, members in series(rows).items():
        sizes = [r["batch_size"] for r in members]
        ax_req.plot(sizes, [r["requests_per_s"] for r in members], marker="o", label=label)
        ax_tok.plot(sizes, [r["output_tokens_per_s"] for r in members], marker="o", label=label)
    batch_axis(ax_req, rows, "successful requests / s")
    batch_axis(ax_tok, rows, "output tokens / s")
    ax_req.legend(fontsize=8)
    fig.suptitle("Throughput vs server batch size")
    save(fig, path)


def plot_latency(rows: list[dict], path: Path) -> None:
    fig, ax = pyplot().subplots(figsize=(7, 4.5))
    for i, (label, members) in enumerate(series(rows).items()):
        for column, style, marker in PERCENTILES:
            ax.plot([r["batch_size"] for r in members], [r[column] / 1000 for r in members], style, marker=marker,
                    color=f"C{i}", label=f"{column[8:11]}, {label}")
    batch_axis(ax, rows, "latency (s)")
    ax.set_title("Latency percentiles vs server batch size")
    ax.legend(fontsize=7)
    save(fig, path)


def plot_histograms(rows: list[dict], latencies: dict[str, list[float]], path: Path) -> None:
    num_cols = min(3, len(rows))
    num_rows = math.ceil(len(rows) / num_cols)
    fig, axes = pyplot().subplots(num_rows, num_cols, figsize=(4 * num_cols, 2.8 * num_rows), squeeze=False)
    top = max(max(v) for v in latencies.values()) / 1000
    for ax, r in zip(axes.flat, rows):
        ax.hist([ms / 1000 for ms in latencies[r["config"]]], bins=30, range=(0, top), color="C0")
        for column, style, _ in PERCENTILES:
            ax.axvline(r[column] / 1000, color="C3", linestyle=style, label=column[8:11])
        ax.set_title(f"{r['label']} batch {r['batch_size']}, delay {r['max_batch_delay_ms']} ms", fontsize=9)
        ax.set(xlabel="latency (s)", ylabel="requests")
    axes.flat[0].legend(fontsize=7)
    for ax in list(axes.flat)[len(rows):]:
        ax.axis("off")
    fig.suptitle("Distribution of request latencies")
    save(fig, path)


def write_plots(rows: list[dict], latencies: dict[str, list[float]], run_dir: Path) -> list[str]:
    """latencies: config name -> every request's latency in ms, keyed like rows' "config"."""
    plot_throughput(rows, run_dir / "throughput.png")
    plot_latency(rows, run_dir / "latency_percentiles.png")
    plot_histograms(rows, latencies, run_dir / "latency_histograms.png")
    return ["throughput.png", "latency_percentiles.png", "latency_histograms.png"]
