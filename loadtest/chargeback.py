"""Chargeback: what each tenant used of a running server and what it cost, from the server's own
per-tenant counters (llm_tenant_*_total on TorchServe's metrics port, config/metrics.yaml). The
cost of the period, the instance's hourly price (loadtest/prices.yaml) times its length, is
allocated by each tenant's share of engine time: the time of every engine step, split among the
requests in it by the tokens computed for each. The period runs from a snapshot saved earlier
(--since FILE, written by --save FILE) to now; without one it is the engine's busy time since the
server started (idle time then costs nobody).

    python -m loadtest.chargeback --save build/chargeback.json      # start of the period
    python -m loadtest.chargeback --since build/chargeback.json     # its table
"""

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import requests

from benchmarks.tables import format_table
from loadtest.measure import load_price

COUNTERS = {"llm_tenant_prompt_tokens_total": "prompt_tokens", "llm_tenant_generation_tokens_total": "output_tokens",
            "llm_tenant_engine_seconds_total": "engine_s"}
COLUMNS = (("tenant", "tenant", "{}"), ("tier", "tier", "{}"), ("num_ok", "answered", "{:.0f}"),
           ("num_limited", "429", "{:.0f}"), ("num_failed", "other 4xx/5xx", "{:.0f}"),
           ("prompt_tokens", "prompt tokens", "{:.0f}"), ("output_tokens", "output tokens", "{:.0f}"),
           ("engine_s", "engine s", "{:.1f}"), ("share", "share", "{:.1%}"), ("usd", "USD", "{:.4f}"))


def scrape(url: str, prefix: str | tuple[str, ...] = "llm_tenant_") -> dict[str, float]:
    """Every sample whose line starts with prefix (the llm_tenant_* ones by default), keyed by its
    line's name and labels (Prometheus text format)."""
    text = requests.get(url, timeout=10).text
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line.startswith(prefix)}


def labels(key: str) -> dict[str, str]:
    inside = key[key.index("{") + 1:key.rindex("}")]
    return {k: v.strip('"') for k, v in (pair.split("=", 1) for pair in inside.split(",") if pair)}


def table(now: dict[str, float], before: dict[str, float]) -> list[dict]:
    """One row per tenant and tier that grew over the period: the growth of its counters."""
    rows: dict[tuple, dict] = defaultdict(lambda: dict.fromkeys(("num_ok", "num_limited", "num_failed",
                                                                 *COUNTERS.values()), 0.0))
    for key, value in now.items():
        name, tags = key.split("{")[0], labels(key)
        row = rows[tags["tenant"], tags["tier"]]
        grown = value - before.get(key, 0.0)
        if name == "llm_tenant_requests_total":
            status = tags["status"]
            row["num_ok" if status == "200" else "num_limited" if status == "429" else "num_failed"] += grown
        elif name in COUNTERS:
            row[COUNTERS[name]] += grown
    return [{"tenant": tenant, "tier": tier, **row} for (tenant, tier), row in sorted(rows.items()) if any(row.values())]


def price(rows: list[dict], period_s: float, usd_per_hour: float) -> None:
    """Each row's share of the engine time and of the period's cost."""
    engine_s = sum(r["engine_s"] for r in rows)
    for r in rows:
        r["share"] = r["engine_s"] / engine_s if engine_s else 0.0
        r["usd"] = r["share"] * period_s / 3600 * usd_per_hour


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--metrics-url", default="http://127.0.0.1:8082/metrics")
    parser.add_argument("--instance", default="cpu-2vcpu", help="price entry in loadtest/prices.yaml")
    parser.add_argument("--since", type=Path, help="a snapshot saved with --save: the period's start")
    parser.add_argument("--save", type=Path, help="write a snapshot of the counters here (a period's start)")
    args = parser.parse_args()

    now = {"time": time.time(), "counters": scrape(args.metrics_url)}
    if args.save:
        args.save.parent.mkdir(parents=True, exist_ok=True)
        args.save.write_text(json.dumps(now))
    before = json.loads(args.since.read_text()) if args.since else {"time": None, "counters": {}}
    rows = table(now["counters"], before["counters"])
    engine_s = sum(r["engine_s"] for r in rows)
    period_s = now["time"] - before["time"] if before["time"] else engine_s
    usd_per_hour = load_price(args.instance)
    price(rows, period_s, usd_per_hour)
    print(f"{'since ' + time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(before['time'])) if before['time'] else 'engine busy time since the server started'}"
          f": {period_s:.0f} s at ${usd_per_hour}/h ({args.instance}), engine busy {engine_s:.0f} s")
    print(format_table(rows, COLUMNS))
    print(json.dumps({"period_s": round(period_s, 1), "engine_s": round(engine_s, 1), "usd_per_hour": usd_per_hour,
                      "tenants": rows}))


if __name__ == "__main__":
    main()
