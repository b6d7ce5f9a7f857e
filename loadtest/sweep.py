"""Server batch-size sweep: what throughput, tail latency, memory and cost each TorchServe
batchSize / maxBatchDelay gives under a fixed number of concurrent Locust users.

    python loadtest/sweep.py --profile quick                          # make sweep (minutes)
    python loadtest/sweep.py --profile full --p99-target-ms 60000     # make sweep PROFILE=full (long)
    python loadtest/sweep.py --mar llm.mar:request-level@llm_handler:request_level \
        --mar llm.mar:continuous@llm_handler:continuous --workload mixed    # one archive, two policies

It starts its own TorchServe on 127.0.0.1 (ports --port..--port+4). Per archive, batch size and
delay it registers the model (API values beat the archive's model-config.yaml), warms up with two
full batches, runs Locust headless (loadtest/locustfile.py) for a bounded number of requests while
sampling the worker's memory, and unregisters. Batch size 1 is the baseline, once per archive.
Results: loadtest/results/<run-id>/ (results.csv, summary.md, plots, Locust's raw CSVs), with
loadtest/results/latest pointing at the newest run. The last printed line is one JSON object.
"""

import argparse
import json
import os
import re
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm

from benchmarks.machine import ROOT, describe
from benchmarks.memory import PeakMemory
from benchmarks.profiles import load_profile
from benchmarks.tables import format_table, write_csv
from loadtest.measure import check_against_locust, load_price, read_locust_row, read_request_log, summarize
from loadtest.plots import write_plots
from loadtest.report import TABLE, baseline_ratio, recommend, write_summary
from loadtest.server import register, unregister, warm_up, worker_pids
from loadtest.tracking import log_to_mlflow   # imports MLflow only when called
from scripts.serve import TorchServeProcess

LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="quick", help="profile in benchmarks/profiles.yaml (quick, full)")
    p.add_argument("--batch-sizes", type=int, nargs="+", help="override the profile's batch sizes")
    p.add_argument("--max-batch-delays", type=int, nargs="+", default=[50], metavar="MS",
                   help="maxBatchDelay values to sweep at every batch size above 1")
    p.add_argument("--mar", action="append", metavar="ARCHIVE[:LABEL][@HANDLER]",
                   help="archive in model_store/ to sweep, repeatable (default llm.mar); @HANDLER registers it "
                        "with the management API's handler=, e.g. llm.mar:rl@llm_handler:request_level")
    p.add_argument("--users", type=int, help="concurrent Locust users (default: the profile's)")
    p.add_argument("--spawn-rate", type=float, help="users started per second (default: all in one second)")
    p.add_argument("--requests", type=int, help="generation requests per configuration, after warm-up")
    p.add_argument("--workload", choices=["fixed", "mixed"], default="fixed",
                   help="max_new_tokens: fixed (the profile's length) or mixed (uniform 16-256)")
    p.add_argument("--max-new-tokens", help="override the workload: N or LOW-HIGH")
    p.add_argument("--stream", action="store_true", help="stream responses (client-side time to first token)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompt mix")
    p.add_argument("--p99-target-ms", type=float, help="recommend the best configuration with p99 within this")
    p.add_argument("--instance", default="cpu-2vcpu", help="price entry in loadtest/prices.yaml")
    p.add_argument("--model-store", type=Path, default=ROOT / "model_store", help="folder holding the archives")
    p.add_argument("--port", type=int, default=18180, help="first of five free loopback ports for TorchServe")
    p.add_argument("--results-dir", type=Path, default=ROOT / "loadtest" / "results")
    p.add_argument("--run-id", help="name of the run's folder (default: time and profile)")
    p.add_argument("--max-run-time", type=int, default=3600, help="seconds one configuration may run at most")
    p.add_argument("--mlflow", action="store_true", help="log each configuration as an MLflow run in mlruns/")
    p.add_argument("--mlflow-experiment", default="torchserve-batch-sweep")
    args = p.parse_args()
    profile = load_profile(args.profile, "sweep")     # fills what the flags left open
    args.batch_sizes = args.batch_sizes or profile["batch_sizes"]
    args.users = args.users or profile["users"]
    args.spawn_rate = args.spawn_rate or args.users
    args.requests = args.requests or profile["requests"]
    if args.max_new_tokens is None:
        args.max_new_tokens = str(profile["fixed_tokens"]) if args.workload == "fixed" else "16-256"
    args.run_id = args.run_id or f"{time.strftime('%Y%m%d-%H%M%S')}-{args.profile}"
    return args


def plan(args: argparse.Namespace) -> list[dict]:
    """Per archive: batch size 1 once, then each larger batch size with each delay."""
    configs = []
    for spec in args.mar or ["llm.mar"]:
        spec, _, handler = spec.partition("@")
        mar, _, label = spec.partition(":")
        if not (args.model_store / mar).is_file():
            raise ValueError(f"archive {mar!r} not found in {args.model_store}; build it first (make mar)")
        label = label or mar.removesuffix(".mar")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", label):
            raise ValueError(f"label must be letters, digits, '_', '.', '-', got {label!r}")
        for batch_size in args.batch_sizes:
            for delay in args.max_batch_delays[:1] if batch_size == 1 else args.max_batch_delays:
                configs.append({"config": f"{label}_b{batch_size}_d{delay}", "label": label, "mar": mar,
                                "handler": handler, "batch_size": batch_size, "max_batch_delay_ms": delay})
    return configs


def run_locust(host: str, prefix: Path, users: int, spawn_rate: float, run_time_s: float,
               flags: list[str], locustfile: Path = LOCUSTFILE) -> list[dict]:
    """One headless run of the locustfile (the sweep's and the soak's): Locust's CSVs and log, its
    console output, our per-request log and prefix_client.json (Locust's own CPU seconds and the
    run's wall seconds: on a small box the load generator shares the server's cores) beside prefix;
    returns the per-request log."""
    cmd = [sys.executable, "-m", "locust", "-f", str(locustfile), "--headless", "--only-summary",
           "-u", str(users), "-r", str(spawn_rate), "--host", host, "--run-time", f"{int(run_time_s)}s",
           "--exit-code-on-error", "0", "--csv", str(prefix), "--logfile", f"{prefix}_locust.log",
           "--request-log", f"{prefix}_requests.jsonl", *flags]
    before, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.monotonic()
    with open(f"{prefix}_locust.txt", "w") as out:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, timeout=run_time_s + 600)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    Path(f"{prefix}_client.json").write_text(json.dumps({"locust_cpu_s": round(cpu_s, 1),
                                                         "wall_s": round(time.monotonic() - t0, 1)}) + "\n")
    if proc.returncode != 0:
        raise RuntimeError(f"locust exited with {proc.returncode}; see {prefix}_locust.txt")
    return read_request_log(Path(f"{prefix}_requests.jsonl"))


def measure_config(args, server, config: dict, raw: Path, settings: dict) -> tuple[dict, list[float]]:
    """Register, warm up, load, unregister; returns the row and every request's latency."""
    model = f"sweep-{config['config']}".replace("_", "-")
    register(server, config["mar"], model, config["batch_size"], config["max_batch_delay_ms"], config["handler"])
    try:
        warm_up(server, model, min(config["batch_size"], args.users))
        with PeakMemory(pids=lambda: worker_pids(server, model), interval_s=0.5) as memory:
            records = run_locust(server.inference_url, raw / config["config"], args.users, args.spawn_rate,
                                 args.max_run_time, ["--model", model, "--max-new-tokens", args.max_new_tokens,
                                                     "--max-requests", str(args.requests), "--seed", str(args.seed),
                                                     *(["--stream"] if args.stream else [])])
    finally:
        unregister(server, model)
    row = {**{k: settings[k] for k in ("run_id", "users", "max_new_tokens", "stream", "seed", "instance",
                                       "usd_per_hour")},
           **config, "max_requests": args.requests, **summarize(records, settings["usd_per_hour"]),
           "ttft_source": "client, first streamed part" if args.stream else "server timings.ttft_ms",
           "peak_worker_rss_mb": round(memory.read_bytes() / 2**20, 1), **settings["machine"]}
    problems = check_against_locust(row, read_locust_row(raw / f"{config['config']}_stats.csv"))
    failed = [r for r in records if not r["ok"]]
    if failed:
        problems.append(f"{len(failed)} failed ({row['errors']}), e.g. {failed[0].get('detail', failed[0]['kind'])}")
    if row["num_requests"] != args.requests:
        problems.append(f"{row['num_requests']} of {args.requests} requests answered within --max-run-time "
                        f"{args.max_run_time}s")
    for problem in problems:
        tqdm.write(f"warning: {config['config']}: {problem}")
    return row, [r["latency_ms"] for r in records]


def run_settings(args: argparse.Namespace) -> dict:
    return {**vars(args), "command": shlex.join(["python", "loadtest/sweep.py", *sys.argv[1:]]),
            "usd_per_hour": load_price(args.instance),
            "load_average_before_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),   # was the machine busy?
            "machine": describe()}


def run_sweep(args, configs: list[dict], run_dir: Path, settings: dict) -> tuple[list[dict], dict]:
    server = TorchServeProcess(ROOT / "build" / "sweep-torchserve" / args.run_id, args.port, models="",
                               model_store=args.model_store.resolve()).start()
    rows, latencies = [], {}
    try:
        for config in tqdm(configs, desc="sweep", unit="config"):
            row, latencies[config["config"]] = measure_config(args, server, config, run_dir / "raw", settings)
            rows.append(row)
            write_csv(rows, run_dir / "results.csv")   # a long sweep that fails later keeps what it measured
            tqdm.write(f"{config['config']}: {row['requests_per_s']:.3f} req/s, "
                       f"{row['output_tokens_per_s']:.1f} tok/s, p99 {row['latency_p99_ms'] / 1000:.2f} s")
    finally:
        server.stop()
    return rows, latencies


def write_outputs(args, rows: list[dict], latencies: dict, run_dir: Path, settings: dict) -> dict:
    """results.csv, plots, summary.md, the latest link and MLflow; returns the run's outcome."""
    best, text = recommend(rows, args.p99_target_ms)
    fastest, baseline, ratio_text = baseline_ratio(rows)
    for r in rows:
        r["meets_p99_target"] = ("" if args.p99_target_ms is None
                                 else r["num_failures"] == 0 and r["latency_p99_ms"] <= args.p99_target_ms)
    write_csv(rows, run_dir / "results.csv")
    plots = write_plots(rows, latencies, run_dir)
    write_summary(run_dir / "summary.md", rows, settings, text, ratio_text, plots)
    latest = args.results_dir / f".latest-{os.getpid()}"    # made aside, then renamed over the old link
    latest.symlink_to(args.run_id)
    os.replace(latest, args.results_dir / "latest")
    tracking_uri = log_to_mlflow(rows, run_dir, args.mlflow_experiment) if args.mlflow else None
    return {"run_dir": str(run_dir), "recommendation": text, "ratio": ratio_text,
            "recommended": best["config"] if best else None, "best_config": fastest["config"] if fastest else None,
            "best_vs_batch1_requests_ratio":
                round(fastest["requests_per_s"] / baseline["requests_per_s"], 3) if fastest else None,
            "mlflow": tracking_uri}


def main() -> None:
    args = parse_args()
    configs = plan(args)
    settings = run_settings(args)
    run_dir = args.results_dir / args.run_id
    (run_dir / "raw").mkdir(parents=True)
    rows, latencies = run_sweep(args, configs, run_dir, settings)
    outcome = write_outputs(args, rows, latencies, run_dir, settings)
    print("\n".join([format_table(rows, TABLE), outcome["recommendation"], outcome["ratio"], f"results: {run_dir}"]))
    keys = ("requests_per_s", "output_tokens_per_s", "latency_p50_ms", "latency_p99_ms", "mean_server_batch_size",
            "num_failures")
    print(json.dumps({**outcome, "configs": {r["config"]: {k: r[k] for k in keys} for r in rows}}))


if __name__ == "__main__":
    main()
