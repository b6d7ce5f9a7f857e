"""What a sweep reports: the recommendation for a p99 target, the throughput ratio to batch size 1
from the same run, the results table and summary.md with the run's settings and machine. Every
number comes from the rows it is given."""

from pathlib import Path

from benchmarks.tables import format_table


def seconds(ms: float) -> str:
    return f"{ms / 1000:.2f}"


TABLE = (  # (column, header, format)
    ("label", "model", "{}"), ("batch_size", "batch", "{}"), ("max_batch_delay_ms", "delay ms", "{}"),
    ("requests_per_s", "req/s", "{:.3f}"), ("output_tokens_per_s", "out tok/s", "{:.1f}"),
    ("latency_p50_ms", "p50 s", seconds), ("latency_p95_ms", "p95 s", seconds),
    ("latency_p99_ms", "p99 s", seconds), ("latency_max_ms", "max s", seconds),
    ("mean_server_batch_size", "mean batch", "{:.2f}"), ("peak_worker_rss_mb", "peak RSS MB", "{:.0f}"),
    ("num_failures", "failed", "{}"), ("usd_per_1k_requests", "$/1k req", "{:.4f}"),
    ("usd_per_million_output_tokens", "$/M out tok", "{:.2f}"),
)


def name(row: dict) -> str:
    return f"{row['label']} batch {row['batch_size']}, delay {row['max_batch_delay_ms']} ms"


def recommend(rows: list[dict], p99_target_ms: float | None) -> tuple[dict | None, str]:
    """The configuration with the most requests/s among those with no failure and, given a
    target, a p99 latency within it; and a sentence saying so, or why there is none."""
    clean = [r for r in rows if r["num_failures"] == 0]
    eligible = [r for r in clean if p99_target_ms is None or r["latency_p99_ms"] <= p99_target_ms]
    if not eligible:
        if not clean:
            return None, "No configuration completed without failures, so none is recommended."
        closest = min(clean, key=lambda r: r["latency_p99_ms"])
        return None, (f"No configuration meets p99 <= {p99_target_ms / 1000:g} s: the lowest p99 was "
                      f"{closest['latency_p99_ms'] / 1000:.2f} s ({name(closest)}).")
    best = max(eligible, key=lambda r: r["requests_per_s"])
    why = "no p99 target given" if p99_target_ms is None else f"p99 <= {p99_target_ms / 1000:g} s"
    return best, (f"Recommended ({why}, no failures, most requests/s): {name(best)}: "
                  f"{best['requests_per_s']:.3f} req/s, {best['output_tokens_per_s']:.1f} output tokens/s, "
                  f"p99 {best['latency_p99_ms'] / 1000:.2f} s.")


def baseline_ratio(rows: list[dict]) -> tuple[dict | None, dict | None, str]:
    """The highest-throughput configuration without failures against the first batch-size-1 row."""
    baseline = next((r for r in rows if r["batch_size"] == 1 and r["num_failures"] == 0), None)
    clean = [r for r in rows if r["num_failures"] == 0]
    if baseline is None or not clean:
        return None, baseline, "Batch size 1 was not measured without failures in this run, so there is no baseline ratio."
    best = max(clean, key=lambda r: r["requests_per_s"])
    return best, baseline, (
        f"Highest throughput: {name(best)} at {best['requests_per_s'] / baseline['requests_per_s']:.2f}x the "
        f"requests/s and {best['output_tokens_per_s'] / baseline['output_tokens_per_s']:.2f}x the output "
        f"tokens/s of batch size 1 without batching ({name(baseline)}, {baseline['requests_per_s']:.3f} req/s) "
        f"in the same run.")


def write_summary(path: Path, rows: list[dict], settings: dict, recommendation: str, ratio: str,
                  plots: list[str]) -> None:
    lines = [f"# Batch-size sweep {settings['run_id']}", "",
             f"Command: `{settings['command']}`", "",
             recommendation, "", ratio, "",
             "Latencies are end-to-end client times in seconds over all requests (Locust's percentile rule); "
             "throughput counts successful requests from the first request sent to the last answer, after warm-up; "
             "mean batch is the mean of the responses' `timings.batch_size` (most sequences a request was decoded with); "
             f"costs use {settings['instance']} at ${settings['usd_per_hour']}/h (loadtest/prices.yaml) "
             "and assume the instance is kept this busy; a configuration meets the p99 target only "
             "without failures.", "",
             format_table(rows, TABLE, markdown=True), "",
             "## Settings", ""]
    lines += [f"- {k}: {v}" for k, v in settings.items() if k not in ("run_id", "command", "machine")]
    lines += ["", "## Machine", ""] + [f"- {k}: {v}" for k, v in settings["machine"].items()]
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    path.write_text("\n".join(lines) + "\n")
