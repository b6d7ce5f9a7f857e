"""`make compare`: ours through TorchServe against vLLM's CPU build, llama.cpp's llama-server and a
naive transformers server, on loopback, one system at a time (start, warm up, measure, stop).

Per point (system x users x plain/streamed): a warm-up of min(users, 8) short requests, then a
closed loop of max(16, 4 x users) requests, none sent after 30 s and any still open at
60 s + 1.5 s x users abandoned and counted (61.5 s at 1 user, 156 s at 64: a full wave of 64 bf16
answers on two AVX2 cores needs about that). Output tokens/s = completion tokens (from each answer's usage) of the answered requests over
the wall time from the first request sent to the last answer; latency and TTFT percentiles over
answered requests; CPU seconds of the server's process tree (psutil), of this client, and of
everything else on the machine (other work there skews the point).

    .venv/bin/python -m compare.run                    # all: compare/results/<run-id>/
    .venv/bin/python -m compare.run --systems ours --users 1 --num-requests 4 --out /tmp/cmp
    .venv/bin/python -m compare.run --paired --systems ours ours-no-spec --num-requests 40   # A/B, taking turns
"""

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import psutil

from benchmarks.machine import describe
from benchmarks.tables import format_table, write_csv
from compare.systems import ROOT, SYSTEMS, System
from compare.workload import CONTEXT_TOKENS, OUTPUT_TOKENS, WORKLOADS, closed_loop, messages, send
from loadtest.measure import percentile

WARMUP_TOKENS = 8
TABLE = (  # (column, header, format)
    ("system", "system", "{}"), ("users", "users", "{}"), ("mode", "mode", "{}"),
    ("output_tokens_per_s", "out tok/s", "{:.1f}"), ("latency_p50_s", "p50 s", "{:.2f}"),
    ("latency_p99_s", "p99 s", "{:.2f}"), ("ttft_p50_s", "TTFT p50 s", "{:.3f}"),
    ("ttft_p99_s", "TTFT p99 s", "{:.3f}"), ("server_cpu_s", "server CPU s", "{:.1f}"),
    ("other_cpu_s", "other CPU s", "{:.1f}"), ("prompt_tokens_mean", "prompt tok", "{}"),
    ("cached_tokens_mean", "cached tok", "{}"), ("draft_acceptance", "drafts kept", "{}"),
    ("window_s", "window s", "{:.1f}"), ("num_ok", "ok", "{}"), ("num_errors", "errors", "{}"),
    ("num_abandoned", "abandoned", "{}"), ("num_short", "short", "{}"),
)


def tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and all its descendants alive now."""
    total = 0.0
    root = psutil.Process(pid)
    for p in [root, *root.children(recursive=True)]:
        try:
            times = p.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def machine_cpu_s() -> float:
    """CPU seconds spent by the whole machine (all cores, every process) since boot."""
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def wait_idle(pid: int, max_wait_s: float = 60, max_cores: float = 0.1) -> None:
    """Until the server's tree uses under max_cores for a second (it may still finish abandoned work)."""
    deadline = time.monotonic() + max_wait_s
    while time.monotonic() < deadline:
        before = tree_cpu_s(pid)
        time.sleep(1)
        if tree_cpu_s(pid) - before < max_cores:
            return


def rounded(x: float | None, digits: int = 3) -> float | None:
    return None if x is None else round(x, digits)


def summarize(records: list[dict], output_tokens: int) -> dict:
    ok = [r for r in records if r["error"] is None and not r["is_abandoned"]]
    errors = [r["error"] for r in records if r["error"] is not None]
    latencies = [r["end"] - r["start"] for r in ok]
    ttfts = [r["ttft_s"] for r in ok if r["ttft_s"] is not None]
    num_tokens = sum(r["completion_tokens"] for r in ok)
    usages = [r.get("usage") or {} for r in ok]
    cached = [u.get("cached_prompt_tokens", (u.get("prompt_tokens_details") or {}).get("cached_tokens")) for u in usages]
    drafted, kept = (sum(u.get(k, 0) for u in usages) for k in ("draft_tokens", "accepted_draft_tokens"))
    window_s = max(r["end"] for r in ok) - min(r["start"] for r in records) if ok else None
    return {
        "num_requests": len(records), "num_ok": len(ok), "num_errors": len(errors),
        "num_abandoned": sum(r["is_abandoned"] for r in records),
        "num_short": sum(r["completion_tokens"] != output_tokens for r in ok),
        "output_tokens": num_tokens, "window_s": rounded(window_s, 2),
        "output_tokens_per_s": round(num_tokens / window_s, 1) if window_s else 0.0,
        "latency_p50_s": rounded(percentile(latencies, 0.50)), "latency_p99_s": rounded(percentile(latencies, 0.99)),
        "ttft_p50_s": rounded(percentile(ttfts, 0.50)), "ttft_p99_s": rounded(percentile(ttfts, 0.99)),
        "prompt_tokens_mean": rounded(sum(u.get("prompt_tokens", 0) for u in usages) / len(ok), 1) if ok else None,
        "cached_tokens_mean": rounded(sum(cached) / len(ok), 1) if ok and None not in cached else None,
        "draft_acceptance": rounded(kept / drafted) if drafted else None,   # ours: drafted tokens kept
        "first_error": errors[0] if errors else "",
    }


def sender(system: System, stream: bool, num_tokens: int, args) -> Callable[[int, float], dict]:
    """send_one(i, deadline): request number i of the workload to this system."""
    url = f"http://127.0.0.1:{system.port}{system.protocol.path}"
    sampling = {"temperature": args.temperature, "top_p": args.top_p} if args.temperature else {}
    return lambda i, deadline: send(url, system.protocol.body(messages(i, args.workload), num_tokens, stream) | sampling,
                                    system.protocol.part, deadline)


def warm_up(system: System, users: int, stream: bool, args) -> None:
    num_warm = min(users, 8)   # short answers: warm-up is for first-call costs, not for the decode
    closed_loop(sender(system, stream, min(WARMUP_TOKENS, args.output_tokens), args), num_warm, num_warm,
                args.warmup_cap_s, args.warmup_cap_s)


def measure_point(name: str, system: System, server, users: int, stream: bool, args) -> dict:
    wait_idle(server.proc.pid)
    warm_up(system, users, stream, args)
    num_requests = args.num_requests or max(16, 4 * users)
    before = (tree_cpu_s(server.proc.pid), time.process_time(), machine_cpu_s())
    cut_cap_s = args.cut_cap_s + args.cut_per_user_s * users
    records = closed_loop(sender(system, stream, args.output_tokens, args), users, num_requests, args.send_cap_s, cut_cap_s)
    server_s, client_s, machine_s = (b - a for a, b in zip(before, (tree_cpu_s(server.proc.pid), time.process_time(),
                                                                   machine_cpu_s())))
    row = {"system": name, "users": users, "mode": "stream" if stream else "plain",
           **summarize(records, args.output_tokens), "server_cpu_s": round(server_s, 1),
           "client_cpu_s": round(client_s, 1), "other_cpu_s": round(machine_s - server_s - client_s, 1)}
    print(f"{name:>12} {users:>3} users {row['mode']:>6}: {row['output_tokens_per_s']:7.1f} tok/s  "
          f"p50 {row['latency_p50_s']} s  ok {row['num_ok']}/{row['num_requests']}  {row['first_error'][:120]}",
          flush=True)
    return row


def run_system(name: str, system: System, args, workdir: Path) -> Iterator[dict]:
    """Every point of one system; a matched system is started anew per load with its limit = users."""
    server = None
    try:
        for users in args.users:
            if server is not None and system.is_matched:
                server.stop()
                server = None
            if server is None:
                logs = workdir / f"{name}-{users}"
                logs.mkdir(parents=True, exist_ok=True)
                server = system.start(users, system.port, logs, CONTEXT_TOKENS[args.workload])
            for stream in args.modes:
                yield measure_point(name, system, server, users, stream, args)
    finally:
        if server is not None:
            server.stop()


def measure_paired(names: list[str], args, workdir: Path) -> Iterator[dict]:
    """--paired: one user, the systems up side by side and taking turns request by request (A B,
    then B A, ...), so a slow spell of a shared machine hits each alike. Output tokens/s is over
    the time spent answering (the sum of the latencies), not the wall time; no CPU accounting."""
    servers = []
    try:
        for name in names:
            (workdir / f"{name}-paired").mkdir(parents=True, exist_ok=True)
            servers.append(SYSTEMS[name].start(1, SYSTEMS[name].port, workdir / f"{name}-paired",
                                               CONTEXT_TOKENS[args.workload]))
        for stream in args.modes:
            records: dict[str, list[dict]] = {name: [] for name in names}
            for name in names:
                warm_up(SYSTEMS[name], 1, stream, args)
            senders = {name: sender(SYSTEMS[name], stream, args.output_tokens, args) for name in names}
            for i in range(args.num_requests or 16):
                for name in names[i % len(names):] + names[:i % len(names)]:
                    records[name].append(senders[name](i, time.perf_counter() + args.cut_cap_s + args.cut_per_user_s))
            for name in names:
                row = {"system": name, "users": 1, "mode": "stream" if stream else "plain",
                       **summarize(records[name], args.output_tokens)}
                busy_s = sum(r["end"] - r["start"] for r in records[name] if r["error"] is None and not r["is_abandoned"])
                row.update(window_s=round(busy_s, 2), output_tokens_per_s=round(row["output_tokens"] / busy_s, 1) if busy_s else 0.0)
                print(f"{name:>12} paired {row['mode']:>6}: {row['output_tokens_per_s']:7.1f} tok/s  "
                      f"p50 {row['latency_p50_s']} s  ok {row['num_ok']}/{row['num_requests']}", flush=True)
                yield row
    finally:
        for server in servers:
            server.stop()


def by_users(rows: list[dict], column: str) -> tuple[list[dict], tuple]:
    """One line per system and mode, one column per load: the table a reader compares across."""
    loads = sorted({r["users"] for r in rows})
    lines = {}
    for r in rows:
        lines.setdefault((r["system"], r["mode"]), {"system": r["system"], "mode": r["mode"]})[r["users"]] = r[column]
    return list(lines.values()), (("system", "system", "{}"), ("mode", "mode", "{}"),
                                  *((u, f"{u} users", "{}") for u in loads))


def describe_machine(systems: dict[str, str]) -> dict:
    """The shared machine description, the CPU features that decide bf16 speed, each system's versions."""
    flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("flags")), [])
    return {**describe(), "cpu_features": [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags],
            "systems": systems}


def write_results(out: Path, rows: list[dict], info: dict, settings: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "points.csv")
    (out / "results.json").write_text(json.dumps({"settings": settings, "machine": info, "points": rows}, indent=1))
    lines = [f"# Framework comparison {settings['run_id']}", "", f"Command: `{settings['command']}`", "",
             (f"CPU: {info['cpu']} ({info['num_cores']} cores; {', '.join(info['cpu_features'])}), "
              f"git {info['git_sha']}, {info['date']}; whole run {settings['wall_s']:.0f} s."), "",
             "Output tokens/s (plain and streamed):", "", format_table(*by_users(rows, "output_tokens_per_s"), markdown=True),
             "", "Every point:", "", format_table(rows, TABLE, markdown=True), "", "## Systems", ""]
    lines += [f"- {k}: {v}" for k, v in info["systems"].items()]
    lines += ["", "## Settings", ""] + [f"- {k}: {v}" for k, v in settings.items() if k not in ("run_id", "command")]
    lines += ["", "## Machine", ""] + [f"- {k}: {v}" for k, v in info.items() if k != "systems"]
    (out / "README.md").write_text("\n".join(lines) + "\n")


def arguments() -> argparse.ArgumentParser:
    """The command line; its defaults are the comparison's settings (compare.engine_loop takes them too)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--systems", nargs="+", choices=list(SYSTEMS),   # default: all but the feature-off variants
                        default=[name for name in SYSTEMS if "-no-" not in name])
    parser.add_argument("--users", nargs="+", type=int, default=[1, 4, 16, 64])
    parser.add_argument("--modes", nargs="+", default=["plain", "stream"], choices=["plain", "stream"])
    parser.add_argument("--workload", default="chat", choices=WORKLOADS, help="compare/workload.py")
    parser.add_argument("--output-tokens", type=int, default=OUTPUT_TOKENS, help="per answer, EOS ignored")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy; else sampled, unseeded")
    parser.add_argument("--top-p", type=float, default=1.0, help="with --temperature")
    parser.add_argument("--num-requests", type=int, default=0, help="per point; 0 = max(16, 4 x users)")
    parser.add_argument("--send-cap-s", type=float, default=30, help="no request sent after this (per point)")
    parser.add_argument("--cut-cap-s", type=float, default=60, help="open requests abandoned at this ...")
    parser.add_argument("--cut-per-user-s", type=float, default=1.5, help="... plus this per user (per point)")
    parser.add_argument("--warmup-cap-s", type=float, default=60)
    parser.add_argument("--paired", action="store_true",
                        help="one user, the systems side by side taking turns request by request (see measure_paired)")
    parser.add_argument("--out", type=Path, help="results folder (default compare/results/<run-id>)")
    parser.add_argument("--logs", type=Path, help="servers' logs and work files (default build/compare/<run-id>)")
    return parser


def main() -> None:
    args = arguments().parse_args()
    args.modes = [m == "stream" for m in args.modes]
    run_id = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = args.out or ROOT / "compare" / "results" / run_id
    workdir = (args.logs or ROOT / "build" / "compare" / run_id).resolve()

    started = time.monotonic()
    rows, skipped = [], {}
    info = describe_machine({})   # each system's versions are added as it starts
    settings = {"run_id": run_id, "command": " ".join(["python -m compare.run", *sys.argv[1:]]),
                "workload": args.workload, "users": args.users, "modes": ["stream" if m else "plain" for m in args.modes],
                "output_tokens": args.output_tokens, "sampling": (f"temperature {args.temperature:g}, top_p {args.top_p:g}"
                                                                  if args.temperature else "greedy"),
                "num_requests": args.num_requests or "max(16, 4 x users)",
                "send_cap_s": args.send_cap_s,
                "cut_cap_s": f"{args.cut_cap_s:g} + {args.cut_per_user_s:g} x users", "skipped": skipped, "logs": str(workdir)}
    if args.paired:
        args.users, settings["users"] = [1], [1]
        info["systems"] = {name: SYSTEMS[name].versions() for name in args.systems}
        for row in measure_paired(args.systems, args, workdir):
            rows.append(row)
            settings["wall_s"] = round(time.monotonic() - started, 1)
            write_results(out, rows, info, settings)
    for name in args.systems if not args.paired else ():
        system = SYSTEMS[name]
        if reason := system.missing():
            print(f"{name}: skipped ({reason})", flush=True)
            skipped[name] = reason
            continue
        info["systems"][name] = system.versions()
        try:
            for row in run_system(name, system, args, workdir):
                rows.append(row)
                settings["wall_s"] = round(time.monotonic() - started, 1)
                write_results(out, rows, info, settings)   # after every point: a run cut short keeps its points
        except (RuntimeError, TimeoutError) as e:   # it did not start: its other points are skipped
            print(f"{name}: stopped ({e})", flush=True)
            skipped[name] = str(e)
    settings["wall_s"] = round(time.monotonic() - started, 1)
    write_results(out, rows, info, settings)
    print(format_table(rows, TABLE))
    print(json.dumps({"results": str(out), "wall_s": settings["wall_s"], "skipped": skipped,
                      "points": [{k: r[k] for k in ("system", "users", "mode", "output_tokens_per_s", "latency_p50_s",
                                                   "latency_p99_s", "ttft_p50_s", "num_errors")} for r in rows]}))


if __name__ == "__main__":
    main()
