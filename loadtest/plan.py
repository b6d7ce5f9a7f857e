"""The capacity planner (#15): N replicas of the service in a discrete-time simulation, each an
engine model fitted to measured runs, behind round-robin or least-connections routing and the HPA
of deploy/base/hpa.yaml. `measure` runs against one real TorchServe: closed-loop Locust runs (the
locustfile's mix, 64 new tokens at most) at 1 / 4 / 16 / 64 users, the start-up time, and two
open-loop runs at constant arrival rates, whose latency the simulation must predict within 25 %.
The plan reads the newest committed measurement.

    python -m loadtest.plan measure      # ~12 min on 2 cores: loadtest/results/plan-<time>/
    python -m loadtest.plan validate --out loadtest/results/plan-<time>    # the fit and check again
    python -m loadtest.plan              # make plan: traces x routing, the replicas for a rate, plots

A replica is llmserve's engine as steps (Engine): a decode step of n sequences costs a fixed part
and a part per sequence, newcomers join at the next step (as many as max_prefill_tokens of prompt
admits, at least one) and their prompts' prefill costs per token; the prompt token's cost is
fitted to the one-user run's TTFTs, the other two to the closed-loop runs' windows by least
squares; a prompt's tokens found in the prefix cache cost nothing. The check replays each open-loop
run's own arrivals and (prompt, answer) lengths through the model; the median of draws from the
arrival process is shown beside it. Up to max_num_seqs run, up to max_waiting_requests wait for a
row, more are refused (503), as the handler does.
"""

import argparse
import heapq
import json
import math
import random
import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy
import yaml

from benchmarks.machine import describe
from benchmarks.plots import pyplot
from benchmarks.tables import format_table
from compare.systems import archive_engine_config
from loadtest.measure import load_price, percentile, read_request_log, window_s
from loadtest.server import wait_idle, warm_up
from loadtest.sweep import ROOT, run_locust
from scripts.serve import TorchServeProcess

RESULTS = ROOT / "loadtest" / "results"
HPA = ROOT / "deploy" / "base" / "hpa.yaml"
HPA_SYNC_S = 15            # the controller's default --horizontal-pod-autoscaler-sync-period
HPA_TOLERANCE = 0.1        # its default --horizontal-pod-autoscaler-tolerance
DT = 0.02                  # simulation step, seconds
METRICS = {"llm_requests_waiting": lambda pod: len(pod.waiting), "llm_requests_running": lambda pod: len(pod.running)}
CURVE_USERS = (1, 4, 16, 64)
MAX_NEW_TOKENS = "64"
SEEDS = 8                  # simulated draws of an open-loop run, for its expected percentiles
COLUMNS = (("trace", "trace", "{}"), ("routing", "routing", "{}"), ("requests", "requests", "{}"),
           ("refused", "refused", "{}"), ("latency_p50_s", "p50 s", "{}"), ("latency_p99_s", "p99 s", "{}"),
           ("mean_replicas", "mean replicas", "{}"), ("max_replicas", "max replicas", "{}"),
           ("usd_per_1k_requests", "$ per 1,000 requests", "{}"))


# -- the model ---------------------------------------------------------------------------------------
@dataclass
class Engine:
    """A replica's engine as its steps: a step that decodes n sequences (a token each) takes
    step_s + per_seq_s * n seconds, and newcomers join at the next step, whose prefill adds
    per_prompt_token_s for each of their prompt tokens (their first token comes with it), as
    llmserve's Engine.step does: as many join as max_prefill_tokens of prompt admits, at least one
    (the scheduler's budget). Fitted to the closed-loop curve runs (fit_engine)."""
    step_s: float
    per_seq_s: float
    per_prompt_token_s: float
    requests: list            # (prompt tokens, output tokens) of the curve runs' answers, drawn from
    startup_s: float          # a replica's start until it answers (TorchServe start + warm-up)
    max_num_seqs: int = 64
    max_waiting: int = 64
    max_prefill_tokens: int = 1 << 30

    def capacity_rps(self) -> float:
        """Requests/s with every row busy: each costs its prefill and its share of full steps."""
        full = self.step_s / self.max_num_seqs + self.per_seq_s
        return len(self.requests) / sum(self.per_prompt_token_s * p + full * (o - 1) for p, o in self.requests)


def computed(record: dict) -> int:
    """A request's prompt tokens the server prefilled: those past its prefix-cache hit (records
    before the locustfile kept cached_prompt_tokens count every token). On the locustfile's mix
    the cache holds about half of them (2195207's message): charging every prompt token made the
    model's latencies pessimistic."""
    return record["prompt_tokens"] - record.get("cached_prompt_tokens", 0)


def fit_engine(runs: dict[int, list[dict]], startup_s: float, max_prefill_tokens: int = Engine.max_prefill_tokens) -> Engine:
    """per_prompt_token_s from the one-user run, where nothing queues: the slope of the handler's
    TTFT (server_ttft_ms) over the prompt tokens it computed (computed()). Then least squares over
    the closed-loop runs at n users, less their prompts' share: a run's window T - per_prompt_token_s * sum(prompt) =
    step_s * (decode steps, about sum(output - 1) / n) + per_seq_s * sum(output - 1), a negative
    one refitted as 0. Fitting all three from the windows failed: the runs' prompt and output
    tokens keep one ratio (1.5-1.9 prompt tokens an output token on the locustfile's mix), so the
    windows cannot tell a prompt token from a sequence's step (AVX2 EPYC, plan-20261206T114228Z:
    per_prompt_token_s came out at or below 0, was clipped to 0, and the model's capacity was 1.49
    requests/s where the 64-user run answered 412 requests in 90 s)."""
    ttfts = [r for r in runs[min(runs)] if r.get("server_ttft_ms") is not None]
    per_prompt = 0.0
    if len({computed(r) for r in ttfts}) > 1:
        (_, slope), *_ = numpy.linalg.lstsq(numpy.array([[1.0, computed(r)] for r in ttfts]),
                                            numpy.array([r["server_ttft_ms"] / 1000 for r in ttfts]), rcond=None)
        per_prompt = max(float(slope), 0.0)
    rows, ys = [], []
    for n, records in runs.items():
        decoded = sum(r["output_tokens"] - 1 for r in records)
        rows.append([decoded / n, decoded])
        ys.append(window_s(records) - per_prompt * sum(computed(r) for r in records))
    x, y = numpy.array(rows, dtype=float), numpy.array(ys)
    coef = numpy.linalg.lstsq(x, y, rcond=None)[0]
    if coef.min() < 0:      # non-negative least squares in two terms: the better of the one-term fits
        fits = []
        for j in range(2):
            one = numpy.zeros(2)
            one[j] = max(numpy.linalg.lstsq(x[:, [j]], y, rcond=None)[0][0], 0.0)
            fits.append(one)
        coef = min(fits, key=lambda c: float(numpy.sum((x @ c - y) ** 2)))
    requests = [(computed(r), r["output_tokens"]) for records in runs.values() for r in records]
    return Engine(float(coef[0]), float(coef[1]), per_prompt, requests, startup_s, max_prefill_tokens=max_prefill_tokens)


@dataclass
class Replica:
    ready_at: float
    running: list = field(default_factory=list)     # heap of (decode steps done when it ends, request)
    waiting: deque = field(default_factory=deque)   # (request, prompt tokens, output tokens)
    steps: int = 0
    busy_until: float = 0.0
    stopping: bool = False

    def load(self) -> int:
        return len(self.running) + len(self.waiting)

    def run_until(self, t: float, engine: Engine, arrivals: list[float], latencies: list) -> None:
        """Every step that starts before t: newcomers prefilled, the running ones decoded a token."""
        while (self.running or self.waiting) and self.busy_until < t:
            # back to back while sequences run; an idle engine starts at the first newcomer's arrival
            start = self.busy_until if self.running else max(self.busy_until, arrivals[self.waiting[0][0]])
            n = len(self.running)
            new, budget = [], engine.max_prefill_tokens
            while self.waiting and n + len(new) < engine.max_num_seqs and (not new or self.waiting[0][1] <= budget):
                new.append(self.waiting.popleft())
                budget -= new[-1][1]
            end = start + (engine.step_s + engine.per_seq_s * n if n else 0.0) + \
                engine.per_prompt_token_s * sum(p for _, p, _ in new)
            if n:
                self.steps += 1
                while self.running and self.running[0][0] <= self.steps:
                    k = heapq.heappop(self.running)[1]
                    latencies[k] = end - arrivals[k]
            for k, _, out in new:
                if out <= 1:
                    latencies[k] = end - arrivals[k]
                else:
                    heapq.heappush(self.running, (self.steps + out - 1, k))
            self.busy_until = end


@dataclass
class Hpa:
    metric: str               # the Pods metric: llm_requests_waiting or llm_requests_running, per pod
    min_replicas: int
    max_replicas: int
    target: float             # its average per pod
    up_window_s: float
    down_window_s: float
    up_pods: int
    up_period_s: float
    down_pods: int
    down_period_s: float

    @classmethod
    def from_manifest(cls, path: Path = HPA) -> "Hpa":
        spec = yaml.safe_load(path.read_text())["spec"]
        up, down = spec["behavior"]["scaleUp"], spec["behavior"]["scaleDown"]
        pods = spec["metrics"][0]["pods"]
        if pods["metric"]["name"] not in METRICS:
            raise ValueError(f"{path}: the planner models the metrics {sorted(METRICS)}, not {pods['metric']['name']}")
        return cls(pods["metric"]["name"], spec["minReplicas"], spec["maxReplicas"], float(pods["target"]["averageValue"]),
                   up["stabilizationWindowSeconds"], down["stabilizationWindowSeconds"],
                   up["policies"][0]["value"], up["policies"][0]["periodSeconds"],
                   down["policies"][0]["value"], down["policies"][0]["periodSeconds"])


def simulate(engine: Engine, arrivals: list[float], routing: str = "least", replicas: int = 1,
             hpa: Hpa | None = None, seed: int = 0, horizon_s: float | None = None,
             sizes: list[tuple[int, int]] | None = None) -> dict:
    """Requests arriving at these times (sorted), each a (prompt, output): sizes[i], or drawn from
    the measured ones; a fixed number of replicas, or an HPA from `replicas` on. Returns each
    request's latency (None: refused, or not answered by the horizon) and a timeline every HPA sync."""
    rng = random.Random(seed)
    pods = [Replica(ready_at=0.0) for _ in range(replicas)]
    latencies: list[float | None] = [None] * len(arrivals)
    timeline, desired_log, scaled = [], [], []   # scaled: (time, +/- pods) for the policies' periods
    rr = 0
    end = horizon_s or (arrivals[-1] if arrivals else 0) + 600
    i, t, next_sync = 0, 0.0, HPA_SYNC_S
    while t < end and (i < len(arrivals) or any(p.load() for p in pods)):
        t += DT
        ready = [p for p in pods if p.ready_at <= t and not p.stopping]
        while i < len(arrivals) and arrivals[i] <= t:
            if ready:            # else nothing serves yet: refused at the door
                if routing == "round-robin":
                    pod = ready[rr % len(ready)]
                    rr += 1
                else:
                    pod = min(ready, key=Replica.load)
                if pod.load() < engine.max_num_seqs + engine.max_waiting:   # else refused (503), as the handler does
                    pod.waiting.append((i, *(sizes[i] if sizes else rng.choice(engine.requests))))
            i += 1
        for pod in pods:
            pod.run_until(t, engine, arrivals, latencies)
        pods = [p for p in pods if not (p.stopping and not p.load())]
        if t >= next_sync:
            next_sync += HPA_SYNC_S
            ready = [p for p in pods if p.ready_at <= t and not p.stopping]
            waiting = sum(len(p.waiting) for p in ready) / max(len(ready), 1)
            current = len([p for p in pods if not p.stopping])
            if hpa:
                ratio = sum(METRICS[hpa.metric](p) for p in ready) / max(len(ready), 1) / hpa.target
                desired = current if abs(ratio - 1) <= HPA_TOLERANCE else math.ceil(current * ratio)
                desired = min(max(desired, hpa.min_replicas), hpa.max_replicas)
                desired_log.append((t, desired))
                # stabilization: up to the lowest desired of the up window, down to the highest of the down one
                up_to = min(d for s, d in desired_log if s > t - hpa.up_window_s - HPA_SYNC_S)
                down_to = max(d for s, d in desired_log if s > t - hpa.down_window_s)
                added = sum(n for s, n in scaled if n > 0 and s > t - hpa.up_period_s)
                removed = -sum(n for s, n in scaled if n < 0 and s > t - hpa.down_period_s)
                if up_to > current:
                    n = min(up_to - current, hpa.up_pods - added)
                    pods += [Replica(ready_at=t + engine.startup_s) for _ in range(max(n, 0))]
                    scaled.append((t, max(n, 0)))
                elif down_to < current:
                    n = min(current - down_to, hpa.down_pods - removed)
                    for p in sorted([p for p in pods if not p.stopping], key=Replica.load)[:max(n, 0)]:
                        p.stopping = True          # drains, as the preStop hook lets it
                    scaled.append((t, -max(n, 0)))
            timeline.append({"t": round(t, 2), "replicas": len([p for p in pods if not p.stopping]),
                             "desired": desired_log[-1][1] if hpa else current,
                             "ready": len(ready), "waiting_per_pod": round(waiting, 2)})
    return {"latencies": latencies, "timeline": timeline}


def stats(latencies: list[float | None]) -> dict:
    done = [x for x in latencies if x is not None]
    return {"requests": len(latencies), "refused": len(latencies) - len(done),
            "latency_p50_s": round(percentile(done, 0.5), 3) if done else None,
            "latency_p99_s": round(percentile(done, 0.99), 3) if done else None}


# -- arrival traces ----------------------------------------------------------------------------------
def paced_users(rate: float, users: int, duration_s: float, seed: int = 0) -> list[float]:
    """The locustfile's --user-rate arrivals: each user one request per users / rate seconds, the
    first at a uniform offset within one period (open loop while answers take less than a period)."""
    rng = random.Random(seed)
    period = users / rate
    times = [offset + k * period for offset in (rng.uniform(0, period) for _ in range(users))
             for k in range(int(duration_s / period) + 1)]
    return sorted(x for x in times if x < duration_s)


def poisson(rate_at, duration_s: float, seed: int = 0) -> list[float]:
    """Poisson arrivals at rate rate_at(t) per second (thinning against its maximum)."""
    rng = random.Random(seed)
    peak = max(rate_at(x) for x in range(int(duration_s) + 1))
    t, out = 0.0, []
    while True:
        t += rng.expovariate(peak)
        if t >= duration_s:
            return out
        if rng.random() < rate_at(t) / peak:
            out.append(t)


def traces(capacity_rps: float, duration_s: float) -> dict:
    """Rates in units of one replica's capacity: steady, a ramp, a burst, a compressed day."""
    c = capacity_rps
    return {
        "steady": lambda t: 2.5 * c,
        "ramp": lambda t: c * (0.2 + 4.8 * t / duration_s),
        "burst": lambda t: c * (4.0 if duration_s / 3 <= t < duration_s / 3 + 120 else 0.8),
        "diurnal": lambda t: c * (2.6 - 2.4 * math.cos(2 * math.pi * t / duration_s)),
    }


# -- measuring the real thing ------------------------------------------------------------------------
def measure(out: Path, port: int, seconds: float, fractions: list[float], users: int) -> None:
    """The runs against one TorchServe: the curve (closed loop), then open loop at shares of the
    capacity the curve gives; each run's per-request log lands in out (validate reads them)."""
    flags = ["--max-new-tokens", MAX_NEW_TOKENS]
    t0 = time.perf_counter()
    server = TorchServeProcess(ROOT / "build" / "plan-ts", port=port).start()
    try:
        warm_up(server, "llm", 8)
        startup_s = time.perf_counter() - t0
        for n in CURVE_USERS:
            wait_idle(server)
            run_locust(server.inference_url, out / f"curve-{n}", n, n, seconds, flags)
        prefill = archive_engine_config()["max_prefill_tokens"]
        engine = fit_engine(curve_runs(out), startup_s, prefill)
        settings = {"machine": describe(), "seconds": seconds, "users_open_loop": users,
                    "startup_s": round(startup_s, 1), "max_prefill_tokens": prefill, "open": []}
        for f in fractions:
            rate = f * engine.capacity_rps()
            settings["open"].append({"fraction": f, "rate_rps": round(rate, 3)})
            (out / "settings.json").write_text(json.dumps(settings, indent=1))
            wait_idle(server)
            run_locust(server.inference_url, out / f"open-{f}", users, users, seconds,
                       flags + ["--user-rate", f"{rate / users:.6f}"])
    finally:
        server.stop()


def curve_runs(out: Path) -> dict[int, list[dict]]:
    return {n: [r for r in read_request_log(out / f"curve-{n}_requests.jsonl") if r["ok"]] for n in CURVE_USERS}


def validate(out: Path) -> dict:
    """The engine model fitted to out's curve runs, and its predictions of out's open-loop runs
    against what they measured: "predicted" replays each run's own arrivals and (prompt, answer)
    lengths, which the 25 % check judges; "drawn" is the median over SEEDS draws of the arrival
    process (paced users) and of the lengths, with the range of their p99: what a run at that rate
    may show. Writes out/plan-measure.json, with the measuring machine (settings.json's; this one
    only for measurements from before it was recorded there)."""
    settings = json.loads((out / "settings.json").read_text())
    runs = curve_runs(out)
    # measurements before the prefill budget was recorded ran with the engine's default then, 4096
    engine = fit_engine(runs, settings["startup_s"], settings.get("max_prefill_tokens", 4096))
    quantiles = ("latency_p50_s", "latency_p99_s")
    validation = []
    def errors(predicted: dict, measured: dict) -> dict:
        return {q: round(predicted[q] / measured[q] - 1, 3) for q in quantiles}
    for run in settings["open"]:
        records = sorted(read_request_log(out / f"open-{run['fraction']}_requests.jsonl"), key=lambda r: r["start"])
        measured = stats([r["latency_ms"] / 1000 if r["ok"] else None for r in records])
        # refused requests arrived too; their lengths were never known, so they take the first measured ones
        replay = stats(simulate(engine, [r["start"] - records[0]["start"] for r in records],
                                sizes=[(computed(r), r["output_tokens"]) if r["ok"] else engine.requests[0]
                                       for r in records])["latencies"])
        predicted = {q: replay[q] for q in quantiles}
        draws = [stats(simulate(engine, paced_users(run["rate_rps"], settings["users_open_loop"], settings["seconds"],
                                                    seed), seed=seed)["latencies"]) for seed in range(SEEDS)]
        drawn = {q: round(statistics.median(d[q] for d in draws), 3) for q in quantiles}
        drawn["p99_range_s"] = [min(d["latency_p99_s"] for d in draws), max(d["latency_p99_s"] for d in draws)]
        error = errors(predicted, measured)
        validation.append({**run, "measured": measured, "predicted": predicted, "relative_error": error,
                           "drawn": drawn, "drawn_relative_error": errors(drawn, measured),
                           "within_25_percent": all(abs(e) <= 0.25 for e in error.values())})
    curve = [{"users": n, "requests": len(rs), "output_tokens_per_s": round(sum(r["output_tokens"] for r in rs)
                                                                         / window_s(rs), 2)} for n, rs in runs.items()]
    result = {"machine": describe(), "command": "python -m loadtest.plan measure", **settings, "curve": curve,
              "engine": {k: getattr(engine, k) for k in ("step_s", "per_seq_s", "per_prompt_token_s", "startup_s",
                                                         "max_prefill_tokens")},
              "capacity_rps": round(engine.capacity_rps(), 3), "requests": engine.requests, "validation": validation}
    (out / "plan-measure.json").write_text(json.dumps(result, indent=1))
    return result


def load_engine(path: Path | None) -> tuple[Engine, Path]:
    if path is None:
        found = sorted(RESULTS.glob("plan-*/plan-measure.json"))
        if not found:
            raise SystemExit("no committed measurement: run `python -m loadtest.plan measure` first")
        path = found[-1]
    m = json.loads(path.read_text())
    return Engine(**m["engine"], requests=[tuple(r) for r in m["requests"]]), path


# -- the plan ----------------------------------------------------------------------------------------
def replicas_for(engine: Engine, rate: float, p99_s: float, duration_s: float, routing: str) -> int | None:
    """The fewest fixed replicas whose simulated p99 at this steady Poisson rate meets p99_s."""
    arrivals = poisson(lambda t: rate, duration_s, seed=1)
    for n in range(1, 65):
        s = stats(simulate(engine, arrivals, routing, replicas=n)["latencies"])
        if s["refused"] == 0 and s["latency_p99_s"] is not None and s["latency_p99_s"] <= p99_s:
            return n
    return None


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    names = sorted({k[0] for k in results})
    fig, axes = plt.subplots(3, len(names), figsize=(4 * len(names), 8), sharex="col", squeeze=False)
    for col, name in enumerate(names):
        for routing, style in (("least", "-"), ("round-robin", "--")):
            tl = results[(name, routing)]["timeline"]
            ts = [p["t"] / 60 for p in tl]
            axes[0][col].plot(ts, [p["replicas"] for p in tl], style, label=routing)
            axes[1][col].plot(ts, [p["waiting_per_pod"] for p in tl], style, label=routing)
            axes[2][col].plot(ts, [p["p99_s"] for p in tl], style, label=routing)
        axes[0][col].set_title(name)
        axes[2][col].set_xlabel("minutes")
    for row, label in enumerate(("replicas", "waiting per pod", "latency p99 s (last minute)")):
        axes[row][0].set_ylabel(label)
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def with_minute_p99(arrivals: list[float], sim: dict) -> None:
    """Each timeline point gets the p99 latency of the requests that arrived in the minute before it."""
    for p in sim["timeline"]:
        window = [x for a, x in zip(arrivals, sim["latencies"]) if x is not None and p["t"] - 60 <= a < p["t"]]
        p["p99_s"] = round(percentile(window, 0.99), 2) if window else None


def check(out: Path) -> None:
    """measure / validate: the fit and the open-loop check, printed."""
    result = validate(out)
    e = result["engine"]
    print(f"engine: a step {1000 * e['step_s']:.1f} ms + {1000 * e['per_seq_s']:.2f} ms a sequence, "
          f"{1000 * e['per_prompt_token_s']:.3f} ms a prompt token; capacity {result['capacity_rps']} req/s")
    for v in result["validation"]:
        print(f"{v['rate_rps']} req/s ({v['fraction']} of capacity): measured p50 / p99 "
              f"{v['measured']['latency_p50_s']} / {v['measured']['latency_p99_s']} s, predicted "
              f"{v['predicted']['latency_p50_s']} / {v['predicted']['latency_p99_s']} s (its arrivals replayed), "
              f"errors {v['relative_error']}, within 25 %: {v['within_25_percent']}; drawn "
              f"{v['drawn']['latency_p50_s']} / {v['drawn']['latency_p99_s']} s (p99 {v['drawn']['p99_range_s']})")
    print(json.dumps({"out": str(out), "validated": all(v["within_25_percent"] for v in result["validation"])}))


def plan(args: argparse.Namespace, out: Path) -> None:
    """Every trace under both routings with the HPA, the replicas for a steady rate; plan.json and plan.png."""
    engine, source = load_engine(args.measurement)
    source = source.resolve()
    shown = str(source.relative_to(ROOT)) if source.is_relative_to(ROOT) else str(source)
    hpa, price = Hpa.from_manifest(args.hpa), load_price(args.instance)
    duration = args.minutes * 60
    results, rows = {}, []
    for name, rate_at in traces(engine.capacity_rps(), duration).items():
        arrivals = poisson(rate_at, duration)
        for routing in ("least", "round-robin"):
            sim = simulate(engine, arrivals, routing, replicas=hpa.min_replicas, hpa=hpa)
            with_minute_p99(arrivals, sim)
            results[(name, routing)] = sim
            s = stats(sim["latencies"])
            replicas = [pt["replicas"] for pt in sim["timeline"]]
            answered = s["requests"] - s["refused"]
            replica_hours = sum(replicas) * HPA_SYNC_S / 3600
            rows.append({"trace": name, "routing": routing, **s, "mean_replicas": round(statistics.mean(replicas), 2),
                         "max_replicas": max(replicas),
                         "usd_per_1k_requests": round(replica_hours * price / answered * 1000, 5) if answered else None})
    target = args.target_rps or 3 * engine.capacity_rps()
    need = {r: replicas_for(engine, target, args.p99_target_s, 600, r) for r in ("least", "round-robin")}
    plot(results, out / "plan.png")
    report = {"machine": describe(), "measurement": shown, "capacity_rps": round(engine.capacity_rps(), 3),
              "startup_s": engine.startup_s,
              "engine": {k: getattr(engine, k) for k in ("step_s", "per_seq_s", "per_prompt_token_s")},
              "hpa": vars(hpa), "instance": args.instance, "rows": rows,
              "sizing": {"target_rps": round(target, 3), "p99_target_s": args.p99_target_s, "replicas": need}}
    (out / "plan.json").write_text(json.dumps(report, indent=1))
    print(f"one replica: {report['capacity_rps']} req/s at 64 users ({shown}); start-up {engine.startup_s} s")
    print(format_table(rows, COLUMNS, markdown=True))
    print(f"replicas for {report['sizing']['target_rps']} req/s at p99 <= {args.p99_target_s} s: {need}")
    print(json.dumps({"out": str(out), "sizing": report["sizing"]}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="?", choices=("plan", "measure", "validate"), default="plan")
    p.add_argument("--measurement", type=Path, help="plan-measure.json to plan with (default: the newest committed)")
    p.add_argument("--seconds", type=float, default=90, help="measure: seconds of each Locust run")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.5, 0.8],
                   help="measure: the open-loop runs' arrival rates, as shares of the 64-user capacity")
    p.add_argument("--users", type=int, default=256, help="measure: open-loop users (each sends rarely)")
    p.add_argument("--port", type=int, default=18480, help="measure: first of five free loopback ports")
    p.add_argument("--minutes", type=float, default=30, help="plan: length of each trace")
    p.add_argument("--target-rps", type=float, default=0, help="plan: steady rate to size for (0: 3x one replica)")
    p.add_argument("--p99-target-s", type=float, default=10.0)
    p.add_argument("--hpa", type=Path, default=HPA, help="plan: the HorizontalPodAutoscaler manifest to simulate")
    p.add_argument("--instance", default="cpu-2vcpu", help="loadtest/prices.yaml's instance a replica runs on")
    p.add_argument("--out", type=Path, help="the plan's folder (default build/plan-<time>), or the measurement's")
    args = p.parse_args()
    stamp = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}"
    if args.what == "plan":
        out = args.out or ROOT / "build" / f"plan-{stamp}"
        out.mkdir(parents=True, exist_ok=True)
        return plan(args, out)
    out = args.out or RESULTS / f"plan-{stamp}"
    if args.what == "measure":
        out.mkdir(parents=True, exist_ok=True)
        measure(out, args.port, args.seconds, args.fractions, args.users)
    check(out)

if __name__ == "__main__":
    main()
