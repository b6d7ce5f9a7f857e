"""The soak: our TorchServe under more load than it can serve, for a long time. It measures the
capacity first (closed loop, as many users as the engine runs sequences), then offers 1.5 times
that rate for --duration seconds: mixed answer lengths, a share streamed, a share of malformed
bodies. Reports lost or malformed answers (must be 0: every request ends in a well-formed answer,
a 400 naming the field, or our own 503), refusals, latency percentiles, and the worker's resident
memory over time (must not grow).

    make soak DURATION=600           # python -m loadtest.soak --duration 600
"""

import argparse
import json
import statistics
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.machine import describe
from benchmarks.memory import PeakMemory
from loadtest.measure import percentile, window_s
from loadtest.server import warm_up, worker_pids
from loadtest.sweep import ROOT, run_locust
from scripts.serve import TorchServeProcess

REFUSALS = ("refused_overloaded", "refused_queue_timeout")


def locust(server, out: Path, name: str, users: int, seconds: float, extra: list[str]) -> list[dict]:
    """A timed run against llm, users started over ~30 s; answers under way at the end get 120 s."""
    return run_locust(server.inference_url, out / name, users, max(1, users // 30), seconds,
                      ["--stop-timeout", "120", *extra])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=600, help="seconds of overload")
    p.add_argument("--capacity-duration", type=float, default=120, help="seconds of the capacity run")
    p.add_argument("--overload", type=float, default=1.5, help="offered rate / measured capacity")
    p.add_argument("--max-new-tokens", default="16-256")
    p.add_argument("--stream-share", type=float, default=0.5)
    p.add_argument("--bad-share", type=float, default=0.05)
    p.add_argument("--slots", type=int, default=64, help="the archive's max_num_seqs: the capacity run's users")
    p.add_argument("--port", type=int, default=18380, help="first of five free loopback ports")
    p.add_argument("--out", type=Path, default=ROOT / "loadtest" / "results" /
                   f"soak-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    common = ["--max-new-tokens", args.max_new_tokens, "--stream-share", str(args.stream_share)]
    server = TorchServeProcess(ROOT / "build" / "soak-ts", port=args.port).start()   # its logs stay out of results
    try:
        warm_up(server, "llm", 8)
        capacity = locust(server, args.out, "capacity", args.slots, args.capacity_duration, common)
        ok = [r for r in capacity if r["ok"]]
        capacity_rps = len(ok) / window_s(ok)
        # enough users that each sends rarely: the offered rate holds while answers slow down
        users = 4 * args.slots
        rate = args.overload * capacity_rps / users
        pid = worker_pids(server, "llm")[0]
        with PeakMemory(pids=lambda: worker_pids(server, "llm"), interval_s=10, keep=True) as memory:
            soak = locust(server, args.out, "soak", users, args.duration,
                          common + ["--bad-share", str(args.bad_share), "--user-rate", f"{rate:.6f}"])
        workers_after = worker_pids(server, "llm")
    finally:
        server.stop()
    kinds = Counter(f"{r['name']}: {r['kind'] or 'ok'}" for r in soak)
    good = [r["latency_ms"] for r in soak if r["ok"] and r["name"] == "generate"]
    refused = [r["latency_ms"] for r in soak if r["kind"] == REFUSALS[0]]
    lost = {k: n for k, n in kinds.items() if k.split(": ")[1] not in ("ok", *REFUSALS)}
    rss = memory.samples
    settle = [m for _, m in rss[len(rss) // 10:]] or [m for _, m in rss]                  # past the first tenth (warm caches)
    tenth = max(1, len(settle) // 10)
    report = {
        "machine": describe(), "settings": vars(args) | {"out": str(args.out)},
        "capacity_requests_per_s": round(capacity_rps, 3), "offered_requests_per_s": round(args.overload * capacity_rps, 3),
        "users": users, "num_requests": len(soak), "outcomes": dict(kinds), "num_lost_or_malformed": sum(lost.values()),
        "num_refused": sum(n for k, n in kinds.items() if k.split(": ")[1] in REFUSALS),
        "answered_per_s": round(len(good) / args.duration, 3),
        **{f"{name}_p{q}_ms": round(percentile(values, q / 100) or 0, 1)
           for name, values in (("latency", good), ("refusal", refused)) for q in (50, 99)},
        "worker_restarted": workers_after != [pid],
        "rss_mb_first_tenth": round(statistics.mean(settle[:tenth]), 1) if settle else None,
        "rss_mb_last_tenth": round(statistics.mean(settle[-tenth:]), 1) if settle else None,
        "rss_mb_samples": rss,
    }
    (args.out / "soak.json").write_text(json.dumps(report, indent=1))
    print(f"capacity {report['capacity_requests_per_s']} req/s; offered {report['offered_requests_per_s']} req/s "
          f"for {args.duration:.0f} s by {users} users")
    print(f"outcomes: {dict(kinds)}")
    print(f"lost or malformed: {report['num_lost_or_malformed']}   refused: {report['num_refused']}   "
          f"answered p50 {report['latency_p50_ms']} ms, p99 {report['latency_p99_ms']} ms; "
          f"refused (overloaded) p50 {report['refusal_p50_ms']} ms, p99 {report['refusal_p99_ms']} ms")
    print(f"worker RSS: {report['rss_mb_first_tenth']} MB -> {report['rss_mb_last_tenth']} MB "
          f"({len(rss)} samples); restarted: {report['worker_restarted']}")
    print(json.dumps({k: v for k, v in report.items() if k not in ("machine", "rss_mb_samples", "settings")}))


if __name__ == "__main__":
    main()
