"""What a sweep reports: results.csv (one row per configuration), the recommendation for a p99
target, the throughput ratio to batch size 1 from the same run, the machine and package
versions, summary.md and the printed table. Every number comes from the rows it is given."""

import csv
import os
import platform
from importlib import metadata
from pathlib import Path

import psutil

PACKAGES = ("torch", "transformers", "torchserve", "locust")
TABLE = (  # (column, header, format)
    ("label", "model", "{}"), ("batch_size", "batch", "{}"), ("max_batch_delay_ms", "delay ms", "{}"),
    ("requests_per_s", "req/s", "{:.3f}"), ("output_tokens_per_s", "out tok/s", "{:.1f}"),
    ("latency_p50_ms", "p50 s", "{:.2f}"), ("latency_p95_ms", "p95 s", "{:.2f}"),
    ("latency_p99_ms", "p99 s", "{:.2f}"), ("latency_max_ms", "max s", "{:.2f}"),
    ("mean_server_batch_size", "mean batch", "{:.2f}"), ("peak_worker_rss_mb", "peak RSS MB", "{:.0f}"),
    ("num_failures", "failed", "{}"), ("usd_per_1k_requests", "$/1k req", "{:.4f}"),
    ("usd_per_million_output_tokens", "$/M out tok", "{:.2f}"),
)


def cell(row: dict, column: str, fmt: str) -> str:
    value = row.get(column)
    if value is None or value == "":
        return "-"
    if column.startswith("latency_"):
        value = value / 1000
    return fmt.format(value)


def format_table(rows: list[dict], markdown: bool = False) -> str:
    header = [h for _, h, _ in TABLE]
    body = [[cell(r, c, f) for c, _, f in TABLE] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(b) + " |" for b in body])
    widths = [max(len(x) for x in col) for col in zip(header, *body)]
    return "\n".join("  ".join(x.rjust(w) for x, w in zip(line, widths)) for line in [header, *body])


def write_csv(rows: list[dict], path: Path) -> None:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)


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


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").is_file():
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    info = {"cpu": cpu, "logical_cpus": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "os": platform.platform(), "python": platform.python_version()}
    for package in PACKAGES:
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info[package] = "not installed"
    return info


def write_summary(path: Path, rows: list[dict], settings: dict, recommendation: str, ratio: str,
                  plots: list[str], machine_info: dict) -> None:
    lines = [f"# Batch-size sweep {settings['run_id']}", "",
             f"Command: `{settings['command']}`", "",
             recommendation, "", ratio, "",
             "Latencies are end-to-end client times in seconds over all requests (Locust's percentile rule); "
             "throughput counts successful requests from the first request sent to the last answer, after warm-up; "
             "mean batch is the mean of the responses' `timings.batch_size` (most sequences a request was decoded with); "
             f"costs use {settings['instance']} at ${settings['usd_per_hour']}/h (loadtest/prices.yaml) "
             "and assume the instance is kept this busy; a configuration meets the p99 target only "
             "without failures.", "",
             format_table(rows, markdown=True), "",
             "## Settings", ""]
    lines += [f"- {k}: {v}" for k, v in settings.items() if k not in ("run_id", "command")]
    lines += ["", "## Machine", ""] + [f"- {k}: {v}" for k, v in machine_info.items()]
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    path.write_text("\n".join(lines) + "\n")
