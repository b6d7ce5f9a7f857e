"""Turns one configuration's raw load-test output (the locustfile's per-request log, Locust's
stats CSV and the worker's peak memory) into one row of numbers, and prices it. Percentiles use
Locust's rank rule on unrounded times, so they match Locust's own up to its rounding."""

import csv
import json
from collections import Counter
from pathlib import Path

import yaml

PRICES = Path(__file__).resolve().parent / "prices.yaml"


def read_request_log(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_locust_row(stats_csv: Path, name: str = "generate") -> dict:
    with open(stats_csv, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["Name"] == name]
    if len(rows) != 1:
        raise ValueError(f"expected one {name!r} row in {stats_csv}, found {len(rows)}")
    return rows[0]


def percentile(values: list[float], q: float) -> float | None:
    """Locust's rule: the value at rank int(n * q) of the sorted values (the largest for q = 1)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(int(len(ordered) * q), len(ordered) - 1)]


def load_price(instance: str, path: Path = PRICES) -> float:
    instances = yaml.safe_load(path.read_text())["instances"]
    if instance not in instances:
        raise ValueError(f"instance {instance!r} not in {path}; known: {sorted(instances)}")
    return float(instances[instance]["usd_per_hour"])


def window_s(records: list[dict]) -> float:
    """Seconds from the first of these requests sent to the last answered (the request log's records)."""
    return max(r["start"] + r["latency_ms"] / 1000 for r in records) - min(r["start"] for r in records)


def summarize(records: list[dict], usd_per_hour: float) -> dict:
    """Throughput over the measured window (first request sent to last answer), latency over all
    requests like Locust's (failures included), the rest over successful ones."""
    assert records, "no requests were logged"
    ok = [r for r in records if r["ok"]]
    latencies = [r["latency_ms"] for r in records]
    window = window_s(records)
    num_output_tokens = sum(r["output_tokens"] for r in ok)
    requests_per_s = len(ok) / window
    tokens_per_s = num_output_tokens / window
    usd_per_s = usd_per_hour / 3600
    ttfts = [r["ttft_ms"] for r in ok if r.get("ttft_ms") is not None]
    errors = Counter(r["kind"] for r in records if not r["ok"])
    return {
        "num_requests": len(records),
        "num_failures": len(records) - len(ok),
        "errors": ";".join(f"{kind}:{n}" for kind, n in sorted(errors.items())),
        "duration_s": round(window, 2),
        "requests_per_s": round(requests_per_s, 4),
        "output_tokens_per_s": round(tokens_per_s, 2),
        "mean_output_tokens": round(num_output_tokens / len(ok), 1) if ok else None,
        **{f"latency_p{q}_ms": round(percentile(latencies, q / 100), 1) for q in (50, 95, 99)},
        "latency_max_ms": round(max(latencies), 1),
        **{f"ttft_p{q}_ms": round(percentile(ttfts, q / 100), 1) if ttfts else None for q in (50, 99)},
        "mean_server_batch_size": round(sum(r["server_batch_size"] for r in ok) / len(ok), 2) if ok else None,
        "usd_per_1k_requests": round(usd_per_s / requests_per_s * 1000, 6) if requests_per_s else None,
        "usd_per_million_output_tokens": round(usd_per_s / tokens_per_s * 1e6, 4) if tokens_per_s else None,
    }


def check_against_locust(row: dict, locust_row: dict) -> list[str]:
    """Where our numbers and Locust's stats CSV disagree (Locust rounds times to 2 significant
    digits above 100 ms); an empty list when they agree."""
    problems = []
    for ours, theirs in (("num_requests", "Request Count"), ("num_failures", "Failure Count")):
        if row[ours] != int(locust_row[theirs]):
            problems.append(f"{ours}={row[ours]} but Locust counted {locust_row[theirs]}")
    for ours, theirs in (("latency_p50_ms", "50%"), ("latency_p95_ms", "95%"), ("latency_p99_ms", "99%")):
        locust_ms = float(locust_row[theirs])
        if abs(row[ours] - locust_ms) > max(1.0, 0.05 * locust_ms):
            problems.append(f"{ours}={row[ours]} but Locust's {theirs} is {locust_ms:g}")
    return problems
