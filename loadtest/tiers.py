"""Priority tiers under overload, in one run against one TorchServe: the capacity first (closed loop,
as many users as the engine runs sequences), then three Locust user classes (premium, standard,
batch; 1:2:1, loadtest/tiers_users.py) offering --overload times that rate, once without tiers
(no X-Priority: all served as standard) and once with; and premium users alone at light load, the
baseline of the aim (premium TTFT p99 at 1.5x capacity within 2x its light-load value, total
output tokens/s at most 5 % lower with tiers). Streamed answers, so TTFT is the client's. Per
class: answered, refused, TTFT and latency p50/p99, and TTFT from the handler's receipt of the
request (timings.ttft_ms: the rest of the client's TTFT was spent in TorchServe before the handler,
mostly waiting for the engine step under way); per run: output tokens/s; the tiered run's
chargeback table from the server's counters. Writes tiers.{json,md,png} under --out.

    make tiers        # python -m loadtest.tiers
"""

import argparse
import json
import time
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.machine import describe
from benchmarks.plots import pyplot
from benchmarks.tables import format_table
from loadtest import chargeback
from loadtest.measure import load_price, percentile, window_s
from loadtest.server import wait_idle, warm_up
from loadtest.sweep import ROOT, run_locust
from scripts.serve import TorchServeProcess

USERS = Path(__file__).resolve().parent / "tiers_users.py"
CLASSES = ("PremiumUser", "StandardUser", "BatchUser")
REFUSED = ("refused_overloaded", "refused_queue_timeout", "http_429")
COLUMNS = (("run", "run", "{}"), ("user_class", "class", "{}"), ("num_sent", "sent", "{}"), ("num_ok", "answered", "{}"),
           ("num_refused", "refused", "{}"), ("num_failed", "failed", "{}"), ("ttft_p50_s", "TTFT p50 s", "{:.2f}"),
           ("ttft_p99_s", "TTFT p99 s", "{:.2f}"), ("handler_ttft_p50_s", "in handler p50 s", "{:.2f}"),
           ("handler_ttft_p99_s", "in handler p99 s", "{:.2f}"), ("latency_p50_s", "latency p50 s", "{:.2f}"),
           ("latency_p99_s", "latency p99 s", "{:.2f}"), ("output_tokens_per_s", "output tok/s", "{:.1f}"))


def summarize(run: str, records: list[dict], user_class: str) -> dict:
    """One class's (or, for "all", every class's) outcome in one run; rates over the run's span."""
    mine = [r for r in records if r["name"] == "generate" and user_class in ("all", r.get("user_class"))]
    ok = [r for r in mine if r["ok"]]
    everyone = [r for r in records if r["ok"]]
    span = (max(r["start"] + r["latency_ms"] / 1000 for r in everyone) - min(r["start"] for r in records)) if everyone else 0
    seconds = lambda values, q: round(percentile(values, q) / 1000, 3) if values else None
    ttft, latency = [r["ttft_ms"] for r in ok if r.get("ttft_ms") is not None], [r["latency_ms"] for r in ok]
    handler = [r["server_ttft_ms"] for r in ok if r.get("server_ttft_ms") is not None]   # from the handler's receipt
    return {"run": run, "user_class": user_class, "num_sent": len(mine), "num_ok": len(ok),
            "num_refused": sum(r["kind"] in REFUSED for r in mine),
            "num_failed": sum(not r["ok"] and r["kind"] not in REFUSED for r in mine),
            "ttft_p50_s": seconds(ttft, 0.5), "ttft_p99_s": seconds(ttft, 0.99),
            "handler_ttft_p50_s": seconds(handler, 0.5), "handler_ttft_p99_s": seconds(handler, 0.99),
            "latency_p50_s": seconds(latency, 0.5), "latency_p99_s": seconds(latency, 0.99),
            "output_tokens_per_s": round(sum(r["output_tokens"] for r in ok) / span, 1) if span else 0.0}


def plot(rows: list[dict], path: Path) -> None:
    fig, axes = pyplot().subplots(1, 2, figsize=(11, 4))
    for ax, key, label in zip(axes, ("ttft_p99_s", "latency_p99_s"), ("TTFT p99 (s)", "latency p99 (s)")):
        for i, run in enumerate(("no tiers", "tiers")):
            values = [next(r[key] or 0 for r in rows if r["run"] == run and r["user_class"] == c) for c in CLASSES]
            ax.bar([x + 0.4 * i for x in range(3)], values, width=0.4, label=f"1.5x capacity, {run}")
        light = next(r[key] for r in rows if r["run"] == "light")
        ax.axhline(light, color="black", linestyle=":", label="premium alone, light load")
        ax.set_xticks([x + 0.2 for x in range(3)], [c.removesuffix("User").lower() for c in CLASSES])
        ax.set(ylabel=label)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=120, help="seconds of each overloaded run")
    p.add_argument("--capacity-duration", type=float, default=60)
    # the light-load p99 is the aim's baseline: 60 s gave ~25 requests, whose slowest (the p99) was
    # whichever summarize prompt came cold (README, Tenants and priority tiers); 300 s gives ~130
    p.add_argument("--light-duration", type=float, default=300)
    p.add_argument("--overload", type=float, default=1.5, help="offered rate / measured capacity")
    p.add_argument("--light", type=float, default=0.1, help="the light-load run's rate / capacity")
    p.add_argument("--max-new-tokens", default="64")
    p.add_argument("--slots", type=int, default=64, help="the archive's max_num_seqs: the capacity run's users")
    p.add_argument("--instance", default="cpu-2vcpu", help="price entry in loadtest/prices.yaml")
    p.add_argument("--port", type=int, default=18480, help="first of five free loopback ports")
    p.add_argument("--out", type=Path, default=ROOT / "loadtest" / "results" /
                   f"tiers-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    common = ["--max-new-tokens", args.max_new_tokens, "--stream", "--stop-timeout", "120"]
    def locust(name: str, users: int, seconds: float, flags: list[str]) -> list[dict]:
        wait_idle(server)     # the last run's unanswered requests out of the engine first
        return run_locust(server.inference_url, args.out / name, users, max(1, users // 30), seconds, common + flags,
                          locustfile=USERS)

    server = TorchServeProcess(ROOT / "build" / "tiers-ts", port=args.port).start()
    try:
        warm_up(server, "llm", 8)
        capacity = [r for r in locust("capacity", args.slots, args.capacity_duration, []) if r["ok"]]
        capacity_rps = len(capacity) / window_s(capacity)
        users = 4 * args.slots    # each sends rarely: the offered rate holds while answers slow down
        rate = ["--user-rate", f"{args.overload * capacity_rps / users:.6f}"]
        runs = {"no tiers": locust("no-tiers", users, args.duration, rate)}
        metrics_url = f"{server.metrics_url}/metrics"
        before, t0 = chargeback.scrape(metrics_url), time.time()
        runs["tiers"] = locust("tiers", users, args.duration, rate + ["--send-priority"])
        bill = chargeback.table(chargeback.scrape(metrics_url), before)
        chargeback.price(bill, time.time() - t0, load_price(args.instance))
        light_users = 8
        runs["light"] = locust("light", light_users, args.light_duration,
                               ["--user-rate", f"{args.light * capacity_rps / light_users:.6f}", "--send-priority",
                                "PremiumUser"])
    finally:
        server.stop()
    rows = [summarize(run, records, c) for run, records in runs.items()
            for c in ((*CLASSES, "all") if run != "light" else ("PremiumUser",))]
    premium = {r["run"]: r for r in rows if r["user_class"] == "PremiumUser"}
    total = {r["run"]: r for r in rows if r["user_class"] == "all"}
    aims = {"premium_ttft_p99_tiers_over_light": round(premium["tiers"]["ttft_p99_s"] / premium["light"]["ttft_p99_s"], 2),
            "premium_ttft_p99_no_tiers_over_light": round(premium["no tiers"]["ttft_p99_s"] / premium["light"]["ttft_p99_s"], 2),
            "throughput_tiers_over_no_tiers": round(total["tiers"]["output_tokens_per_s"]
                                                    / total["no tiers"]["output_tokens_per_s"], 3)}
    client = {name: json.loads((args.out / f"{name}_client.json").read_text())
              for name in ("capacity", "no-tiers", "tiers", "light")}
    report = {"machine": describe(), "settings": {k: str(v) for k, v in vars(args).items()}, "client": client,
              "capacity_requests_per_s": round(capacity_rps, 3),
              "offered_requests_per_s": round(args.overload * capacity_rps, 3), "users": users,
              "aims": aims, "rows": rows, "chargeback_tiers_run": bill}
    (args.out / "tiers.json").write_text(json.dumps(report, indent=1))
    plot(rows, args.out / "tiers.png")
    m = report["machine"]
    (args.out / "tiers.md").write_text(
        f"Measured on {m['cpu']}, {m['num_cores']} cores, torch {m['torch']}, git {m['git_sha']}, {m['date']}; "
        f"command: python -m loadtest.tiers --duration {args.duration:g} --overload {args.overload:g} "
        f"--light-duration {args.light_duration:g}. "
        f"Capacity {capacity_rps:.3f} req/s (closed loop, {args.slots} users), offered "
        f"{args.overload * capacity_rps:.3f} req/s by {users} users; light load: premium alone at "
        f"{args.light:g}x capacity.\n\n{format_table(rows, COLUMNS, markdown=True)}\n\nAims: {json.dumps(aims)}\n\n"
        f"Locust's own CPU, on the server's cores: "
        + ", ".join(f"{name} {c['locust_cpu_s']:g} s over {c['wall_s']:g} s" for name, c in client.items()) + ".\n\n"
        f"Chargeback of the tiered run (loadtest.chargeback on the server's counters, {args.instance} prices):\n\n"
        f"{format_table(bill, chargeback.COLUMNS, markdown=True)}\n")
    print(format_table(rows, COLUMNS))
    print(json.dumps({"out": str(args.out), "capacity_requests_per_s": report["capacity_requests_per_s"], **aims}))


if __name__ == "__main__":
    main()
