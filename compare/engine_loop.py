"""Our engine alone, in this process (no TorchServe, no HTTP), under the comparison's closed loop:
the same prompts, 64 output tokens with EOS ignored, greedy, `users` requests kept in the engine
(a finished one is replaced at once) until max(16, 4 x users) have been answered. Configured as
llm.mar is (its model-config.yaml's handler section), so the gap to `compare.run`'s `ours` is
what TorchServe and the handler cost. Writes engine-in-process.json into --out.

    .venv/bin/python -m compare.engine_loop --users 1 4 16 64 --out compare/results/<run-id>

--beside-torchserve N: ours through TorchServe is started too and, at each load, the two take N
turns each (in process, TorchServe; then TorchServe, in process; ...), plain answers: this machine's
speed drifts by tens of percent within minutes, so only points taken turn about compare the two.
Writes engine-beside-torchserve.json.
"""

import argparse
import json
import time
from pathlib import Path

from benchmarks.machine import describe
from benchmarks.tables import format_table
from compare.run import arguments, measure_point
from compare.systems import ROOT, SYSTEMS, archive_engine_config
from compare.workload import CONTEXT_TOKENS, OUTPUT_TOKENS, messages
from llmserve.config import EngineConfig
from llmserve.engine import Engine
from llmserve.request import parse_request
from loadtest.measure import percentile

COLUMNS = (("users", "users", "{}"), ("output_tokens_per_s", "out tok/s", "{:.1f}"),
           ("latency_p50_s", "p50 s", "{:.2f}"), ("ttft_p50_s", "TTFT p50 s", "{:.3f}"),
           ("ttft_p99_s", "TTFT p99 s", "{:.3f}"), ("num_requests", "answered", "{}"))


def closed_loop(engine: Engine, users: int, num_requests: int) -> dict:
    sent, running, done = 0, [], []
    def send() -> None:
        nonlocal sent
        body = {"messages": messages(sent), "max_new_tokens": OUTPUT_TOKENS, "ignore_eos": True, "temperature": 0}
        r = parse_request(f"{users}-{sent}", body, engine.config, engine.tokenizer)
        engine.add_request(r)
        running.append(r)
        sent += 1
    t0 = time.perf_counter()
    for _ in range(min(users, num_requests)):
        send()
    while running:
        engine.step()
        for r in [r for r in running if r.is_finished]:
            running.remove(r)
            done.append(r)
            if sent < num_requests:
                send()
    wall = time.perf_counter() - t0
    latencies = [r.finish_time - r.arrival_time for r in done]
    ttfts = [r.first_token_time - r.arrival_time for r in done]
    return {"users": users, "output_tokens_per_s": sum(len(r.output_ids) for r in done) / wall,
            "latency_p50_s": percentile(latencies, 0.50), "ttft_p50_s": percentile(ttfts, 0.50),
            "ttft_p99_s": percentile(ttfts, 0.99), "num_requests": len(done)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", nargs="+", type=int, default=[1, 4, 16, 64])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--beside-torchserve", type=int, default=0, metavar="N", help="turns each (see above)")
    args = parser.parse_args()

    section = archive_engine_config()                          # model_path made absolute by build_mar
    engine = Engine.from_config(EngineConfig.from_dict(section))
    closed_loop(engine, 1, 2)                                  # warm-up, as the handler's start-up request
    if args.beside_torchserve:
        rows = beside_torchserve(engine, args.users, args.beside_torchserve, args.out)
        name, columns = "engine-beside-torchserve.json", (("system", "system", "{}"), *COLUMNS)
    else:
        rows = [closed_loop(engine, users, max(16, 4 * users)) for users in args.users]
        name, columns = "engine-in-process.json", COLUMNS
    print(format_table(rows, columns))
    report = {"machine": describe(), "config": section,
              "compiled_graphs": engine.facts.compiled_graphs, "packed_max_rows": engine.facts.packed_max_rows,
              "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / name).write_text(json.dumps(report, indent=1))
    print(json.dumps({"out": str(args.out / name), "rows": rows}))


def beside_torchserve(engine: Engine, loads: list[int], turns: int, out: Path) -> list[dict]:
    """Rows of the engine in process and of ours through TorchServe (a compare.run point with its
    default settings, plain answers), taking turns at each load: A B B A A B ..."""
    system = SYSTEMS["ours"]
    logs = ROOT / "build" / "compare" / out.name                 # TorchServe's logs and work files, as compare.run's
    logs.mkdir(parents=True, exist_ok=True)
    server = system.start(max(loads), system.port, logs, CONTEXT_TOKENS["chat"])
    settings = arguments().parse_args([])
    rows = []
    try:
        for users in loads:
            for turn in range(2 * turns):
                if turn % 4 in (0, 3):
                    rows.append({"system": "in process", **closed_loop(engine, users, max(16, 4 * users))})
                    print(f"  in process {users:>3} users: {rows[-1]['output_tokens_per_s']:7.1f} tok/s", flush=True)
                else:
                    rows.append(measure_point("TorchServe", system, server, users, False, settings))
    finally:
        server.stop()
    return rows


if __name__ == "__main__":
    main()
