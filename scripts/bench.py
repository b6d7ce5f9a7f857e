"""Benchmark: quantization mode x prompt length x KV cache on/off, with WikiText-2 perplexity.

Per run (one request at a time, greedy, exactly max_new_tokens new tokens, EOS ignored): time to
first token (prefill: compute bound, grows with the prompt), decode time and tokens/s for tokens
2..N (memory-bandwidth bound: each token reads every weight plus the KV cache, or without a cache
re-runs the whole sequence), total latency, peak memory (GPU: max_memory_allocated; CPU: peak
resident set, reset before each run) and the weights' bytes; perf_counter read after a device sync.
Each mode runs in its own process (benchmarks/worker.py) loaded by the handler's own code, so one
mode's memory never shows in another's. The grid is the profile's bench section in profiles.yaml.

    python scripts/bench.py --profile quick       # make bench: minutes on a 2-core CPU
    python scripts/bench.py --profile full        # make bench PROFILE=full: the real grid, hours
    python scripts/bench.py --profile full --device cuda --model-shape llama3-8b --out results/gpu

Writes OUT/benchmarks/results.csv (every timed run), OUT/metrics/final_report.json (per mode),
OUT/figures/*.png and OUT/benchmarks/report.html, each with its machine; prints a table, then JSON.
"""

import argparse
import json
import multiprocessing
import sys
import time
from pathlib import Path

from tqdm import tqdm

from benchmarks import report, worker
from benchmarks.machine import ROOT, describe
from benchmarks.profiles import PROFILES, load_profile, run_counts
from benchmarks.shapes import SHAPES, build_shape_model


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="quick", help="profile in the profiles file (quick, full)")
    p.add_argument("--profiles", type=Path, default=PROFILES, help="the profiles file")
    p.add_argument("--modes", default="", help="comma-separated subset of the profile's modes")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--num-threads", type=int, default=0, help="torch CPU threads; 0 = torch's default")
    p.add_argument("--model-path", type=Path, default=ROOT / "models" / "smollm2-135m-instruct")
    p.add_argument("--model-shape", choices=sorted(SHAPES), help="random weights of this shape (no perplexity)")
    p.add_argument("--shape-dir", type=Path, default=ROOT / "build", help="where --model-shape weights are kept")
    p.add_argument("--out", type=Path, default=ROOT, help="output root for benchmarks/, metrics/, figures/")
    return p.parse_args()


def run_mode(mode: str, grid: dict, args: argparse.Namespace, model_path: Path, bar) -> tuple[list[dict], dict]:
    """Run one mode's worker process; returns its timed rows and its closing event (done or skipped)."""
    context = multiprocessing.get_context("spawn")    # a fresh interpreter: no memory of the last mode
    reader, writer = context.Pipe(duplex=False)
    options = {"device": args.device, "num_threads": args.num_threads}
    proc = context.Process(target=worker.run, args=(mode, grid, model_path, options, writer))
    proc.start()
    writer.close()       # the worker now holds the only writer: reading ends when it exits
    rows, end = [], None
    while True:
        try:
            event = reader.recv()
        except EOFError:
            break
        kind = event.pop("event")
        if kind == "plan":
            bar.total += event["num_steps"]
            bar.refresh()
        elif kind in ("run", "window"):
            bar.update()
            if kind == "run" and not event.pop("is_warmup"):
                rows.append({"mode": mode, **event})
        else:
            end = {"event": kind, **event}
    proc.join()
    return rows, end or {"event": "skipped", "reason": f"worker failed with exit code {proc.exitcode} (see its stderr)"}


def run_modes(grid: dict, args: argparse.Namespace, model_path: Path) -> tuple[list[dict], dict]:
    """Every mode in turn, each in a fresh process; returns all timed rows and each mode's end event."""
    runs_per_mode = len(grid["context_lengths"]) * sum(
        c["warmup_runs"] + c["num_prompts"] * c["timed_runs"] for c in (run_counts(grid, kv) for kv in grid["kv_cache"]))
    rows, ends = [], {}
    with tqdm(total=runs_per_mode * len(grid["modes"]), desc="bench", unit="step", file=sys.stderr) as bar:
        for mode in grid["modes"]:
            bar.set_postfix_str(mode)
            mode_rows, end = run_mode(mode, grid, args, model_path, bar)
            ends[mode] = end
            if end["event"] == "done":   # a mode that failed half way keeps none of its rows
                rows += [{**r, "dtype": end["dtype"], "weight_mb": end["weight_mb"], "device": end["device"],
                          "model": model_path.name, "seed": grid["seed"]} for r in mode_rows]
            bar.total = bar.n + runs_per_mode * (len(grid["modes"]) - len(ends))
    return rows, ends


def main() -> None:
    args = parse_args()
    grid = load_profile(args.profile, "bench", args.profiles)
    if args.modes:
        if any(m not in grid["modes"] for m in args.modes.split(",")):
            raise ValueError(f"--modes {args.modes!r} must be a subset of {grid['modes']}")
        grid["modes"] = args.modes.split(",")
    start = time.perf_counter()
    model_path = build_shape_model(args.model_shape, args.model_path, args.shape_dir) if args.model_shape else args.model_path
    rows, ends = run_modes(grid, args, model_path)
    summary = report.summarize(rows)
    final = report.build_report(summary, ends, grid, args.profile, model_path.name, describe())
    files = report.write_outputs(args.out, rows, summary, final)
    print("\n" + report.table(summary, final))
    top, modes = max(grid["context_lengths"]), [m for m in grid["modes"] if m in final]
    print(json.dumps({"profile": args.profile, "wall_s": round(time.perf_counter() - start, 1), "device": final["device"],
                      "num_timed_runs": len(rows), f"tokens_s_{top}": {m: final[m][f"tokens_s_{top}"] for m in modes},
                      "ppl": {m: final[m]["ppl"] for m in modes}, "skipped": final["skipped"],
                      "files": [str(f) for f in files]}))


if __name__ == "__main__":
    main()
