"""Benchmark: quantization mode x prompt length x KV cache on/off, with WikiText-2 perplexity.

Per run (one request at a time, greedy, exactly max_new_tokens new tokens, EOS ignored): time to
first token (prefill), decode time for tokens 2..N and decode tokens/s, total latency, the process's
peak memory during that run (GPU: max_memory_allocated; CPU: peak resident set, reset before each
run) and the weights' bytes. Prefill is compute bound and grows with the prompt; decode is memory
bandwidth bound: each token reads every weight, plus the KV cache, or without a cache re-runs the
whole sequence. Clocks: perf_counter after a device sync (token ids reach the host each step),
CUDA events for the total on a GPU. Each mode runs in its own subprocess, loaded by the handler's
own code (llmserve.load), so one mode's memory never shows in another's. Grid: benchmarks/grid.yaml.

    python scripts/bench.py --profile quick       # make bench: minutes on a 2-core CPU
    python scripts/bench.py --profile full        # make bench PROFILE=full: the real grid, hours
    python scripts/bench.py --profile full --device cuda --model-shape llama3-8b --out results/gpu

Writes OUT/benchmarks/results.csv (every timed run), OUT/metrics/final_report.json (per mode),
OUT/figures/*.png and OUT/benchmarks/report.html; prints a table, then one JSON object last.
"""

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import yaml

from llmserve.config import QUANTIZATION_MODES

ROOT = Path(__file__).resolve().parent.parent
WIKITEXT = ROOT / "data" / "wikitext-2" / "test.txt"
PRECISION_ORDER = ("fp32", "fp16", "bf16", "int8", "nf4", "fp4")   # perplexity baseline: first that ran
GRID_KEYS = {"modes", "context_lengths", "kv_cache", "num_prompts", "warmup_runs", "timed_runs",
             "max_new_tokens", "seed", "perplexity"}
RUN_COUNTS = ("num_prompts", "warmup_runs", "timed_runs")   # the optional no_cache section may lower these
EVENT = "@bench "            # prefix of the worker's event lines on its stdout
METRICS = ("prefill_ms", "decode_ms", "decode_tokens_s", "total_ms", "peak_mem_mb")
COLUMNS = ("mode", "context_len", "kv_cache", "template", "prompt_index", "run_index", "prompt_tokens",
           "new_tokens", *METRICS, "weight_mb", "dtype", "device", "model", "seed")
SHAPES = {   # published architectures, built with random weights: valid for speed and memory only
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                      rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, rms_norm_eps=1e-5,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="quick", help="section of the grid file (quick, full)")
    p.add_argument("--grid", type=Path, default=ROOT / "benchmarks" / "grid.yaml")
    p.add_argument("--modes", default="", help="comma-separated subset of the profile's modes")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--num-threads", type=int, default=0, help="torch CPU threads; 0 = torch's default")
    p.add_argument("--model-path", type=Path, default=ROOT / "models" / "smollm2-135m-instruct")
    p.add_argument("--model-shape", choices=sorted(SHAPES), help="random weights of this shape (no perplexity)")
    p.add_argument("--shape-dir", type=Path, default=ROOT / "build", help="where --model-shape weights are kept")
    p.add_argument("--out", type=Path, default=ROOT, help="output root for benchmarks/, metrics/, figures/")
    p.add_argument("--worker", choices=QUANTIZATION_MODES, help=argparse.SUPPRESS)  # internal: one mode
    return p.parse_args()


def load_grid(path: Path, profile: str, modes: str) -> dict:
    profiles = yaml.safe_load(path.read_text())
    if profile not in profiles:
        raise ValueError(f"profile {profile!r} is not in {path}; it has {sorted(profiles)}")
    grid = profiles[profile]
    if not GRID_KEYS <= set(grid) <= GRID_KEYS | {"no_cache"}:
        raise ValueError(f"profile {profile!r} must have the keys {sorted(GRID_KEYS)} (and may have no_cache), "
                         f"got {sorted(grid)}")
    no_cache = grid.get("no_cache", {})
    if not set(no_cache) <= set(RUN_COUNTS) or no_cache.get("num_prompts", 0) > grid["num_prompts"]:
        raise ValueError(f"no_cache in profile {profile!r} may only lower {RUN_COUNTS}, got {no_cache}")
    bad = [m for m in grid["modes"] if m not in QUANTIZATION_MODES]
    if bad:
        raise ValueError(f"unknown modes {bad} in profile {profile!r}; known: {QUANTIZATION_MODES}")
    if modes:
        wanted = modes.split(",")
        if any(m not in grid["modes"] for m in wanted):
            raise ValueError(f"--modes {modes!r} must be a subset of {grid['modes']}")
        grid = {**grid, "modes": wanted}
    return grid


def run_counts(grid: dict, kv_cache: bool) -> dict:
    """num_prompts, warmup_runs and timed_runs of one KV setting."""
    counts = {k: grid[k] for k in RUN_COUNTS}
    return counts if kv_cache else {**counts, **grid.get("no_cache", {})}


def build_shape_model(shape: str, tokenizer_dir: Path, shape_dir: Path) -> Path:
    """Save a model of `shape` with random bf16 weights (once) so every mode loads it like a real one."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    path = shape_dir / f"{shape}-random"
    if not (path / "random-weights.json").is_file():
        torch.manual_seed(0)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = AutoModelForCausalLM.from_config(LlamaConfig(**SHAPES[shape]), dtype=torch.bfloat16)
        model.save_pretrained(path)
        AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True).save_pretrained(path)
        (path / "random-weights.json").write_text(json.dumps({"shape": shape, "seed": 0}))
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()    # the workers need the GPU memory, not this process
    return path


# -- one mode, in its own process --------------------------------------------------------------------
def run_worker(mode: str, grid: dict, args: argparse.Namespace) -> None:
    import dataclasses

    import torch
    from benchmarks import measure
    from llmserve.config import EngineConfig
    from llmserve.engine import Engine
    from llmserve.load import load_model

    def emit(event: str, **fields) -> None:
        print(EVENT + json.dumps({"event": event, **fields}), flush=True)

    torch.manual_seed(grid["seed"])
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(grid["seed"])
    lengths, max_new = grid["context_lengths"], grid["max_new_tokens"]
    config = EngineConfig(model_path=str(args.model_path), quantization=mode, device=args.device,
                          max_model_len=max(lengths) + max_new, max_num_seqs=1, max_prefill_tokens=max(lengths),
                          max_new_tokens_cap=max_new, default_max_new_tokens=max_new, num_threads=args.num_threads)
    try:
        model, tokenizer, facts = load_model(config)
    except ValueError as e:       # this device cannot run this mode
        return emit("skipped", reason=str(e))
    # no stop tokens: every run decodes exactly max_new_tokens, whatever the text says
    engine = Engine(model, tokenizer, config, dataclasses.replace(facts, stop_token_ids=frozenset()))
    wiki = WIKITEXT.read_text()
    ppl = grid["perplexity"]
    ppl_ids = [] if args.model_shape else measure.perplexity_ids(tokenizer, wiki, ppl["max_tokens"])
    emit("plan", num_steps=measure.num_windows(len(ppl_ids), ppl["window"], ppl["stride"]) if ppl_ids else 0)

    peak = measure.PeakMemory(facts.device)
    for length in lengths:
        prompts = [measure.make_prompt(tokenizer, wiki, i, length) for i in range(grid["num_prompts"])]
        for kv_cache in grid["kv_cache"]:
            counts = run_counts(grid, kv_cache)
            num_prompts, num_warmup = counts["num_prompts"], counts["warmup_runs"]
            for step in range(num_warmup + num_prompts * counts["timed_runs"]):
                k = step if step < num_warmup else step - num_warmup
                template, ids = prompts[k % num_prompts]
                peak.reset()
                if kv_cache:
                    t = measure.run_cached(engine, f"{length}-{step}", ids, max_new)
                else:
                    t = measure.run_uncached(model, ids, max_new, facts.device)
                emit("run", is_warmup=step < num_warmup, context_len=length, kv_cache=kv_cache, template=template,
                     prompt_index=k % num_prompts, run_index=k // num_prompts, prompt_tokens=len(ids),
                     peak_mem_mb=peak.read_bytes() / 2**20, **t)
    value = measure.perplexity(model, ppl_ids, ppl["window"], ppl["stride"], facts.device,
                               on_window=lambda: emit("window")) if ppl_ids else None
    emit("done", ppl=value, ppl_tokens=len(ppl_ids), weight_mb=facts.weight_bytes / 2**20, dtype=str(facts.dtype),
         device=measure.device_name(facts.device))


# -- the parent: one subprocess per mode, then the outputs ---------------------------------------
def run_mode(mode: str, args: argparse.Namespace, model_path: Path, bar) -> tuple[list[dict], dict]:
    """Run one mode's worker; returns its timed rows and its closing event (done or skipped)."""
    cmd = [sys.executable, __file__, "--worker", mode, "--profile", args.profile, "--grid", str(args.grid),
           "--modes", mode, "--device", args.device, "--num-threads", str(args.num_threads), "--model-path", str(model_path)]
    cmd += ["--model-shape", args.model_shape] if args.model_shape else []
    rows, end = [], None
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True,
                                env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
        for line in proc.stdout:
            if not line.startswith(EVENT):
                continue
            event = json.loads(line[len(EVENT):])
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
        proc.wait()
        if end is None:
            log.seek(0)
            tail = log.read().strip().splitlines()[-1:] or ["no output"]
            end = {"event": "skipped", "reason": f"worker failed with exit code {proc.returncode}: {tail[0]}"}
    return rows, end


def summarize(rows: list[dict]) -> list[dict]:
    """Medians of the timed runs per configuration (mode, context length, KV cache)."""
    groups = defaultdict(list)
    for r in rows:
        groups[(r["mode"], r["context_len"], r["kv_cache"])].append(r)
    return [{"mode": m, "context_len": n, "kv_cache": kv, "num_runs": len(g), "weight_mb": g[0]["weight_mb"],
             **{k: statistics.median(r[k] for r in g) for k in METRICS}} for (m, n, kv), g in groups.items()]


def build_report(summary: list[dict], ends: dict, grid: dict, args: argparse.Namespace, model: str) -> dict:
    at = {(s["mode"], s["context_len"], s["kv_cache"]): s for s in summary}
    done = {m: e for m, e in ends.items() if e["event"] == "done"}
    baseline = next((m for m in PRECISION_ORDER if m in done and done[m]["ppl"]), None)
    top, report = max(grid["context_lengths"]), {}
    for mode, end in done.items():
        entry = {}
        for n in grid["context_lengths"]:
            on, off = at.get((mode, n, True), {}), at.get((mode, n, False), {})
            entry.update({f"tokens_s_{n}": on.get("decode_tokens_s"), f"tokens_s_no_cache_{n}": off.get("decode_tokens_s"),
                          f"prefill_ms_{n}": on.get("prefill_ms"), f"total_ms_{n}": on.get("total_ms"),
                          f"total_ms_no_cache_{n}": off.get("total_ms"),
                          f"mem_gb_{n}": on["peak_mem_mb"] * 2**20 / 1e9 if on else None})
        entry.update(prefill_ms=entry[f"prefill_ms_{top}"], vram_gb=entry[f"mem_gb_{top}"],
                     weights_gb=end["weight_mb"] * 2**20 / 1e9, dtype=end["dtype"], ppl=end["ppl"],
                     ppl_degradation_pct=(end["ppl"] / done[baseline]["ppl"] - 1) * 100 if end["ppl"] and baseline else None)
        report[mode] = entry
    device = next((e["device"] for e in done.values()), args.device)
    return {**report, "device": device, "model": model, "profile": args.profile, "grid": grid,
            "memory": "torch.cuda.max_memory_allocated" if device.startswith("cuda") else "peak resident set of the process",
            "baseline_mode": baseline, "skipped": {m: e["reason"] for m, e in ends.items() if e["event"] == "skipped"},
            "versions": {p: metadata.version(p) for p in ("torch", "transformers", "bitsandbytes")} | {"python": sys.version.split()[0]},
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def write_outputs(out: Path, rows: list[dict], summary: list[dict], report: dict) -> list[Path]:
    from benchmarks import plots

    for d in ("benchmarks", "metrics", "figures"):
        (out / d).mkdir(parents=True, exist_ok=True)
    with open(out / "benchmarks" / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()} for r in rows)
    (out / "metrics" / "final_report.json").write_text(json.dumps(report, indent=2) + "\n")
    figures = plots.write_figures(summary, report, out / "figures", out / "benchmarks" / "report.html")
    return [out / "benchmarks" / "results.csv", out / "metrics" / "final_report.json", *figures]


def print_table(summary: list[dict], report: dict) -> None:
    at = {(s["mode"], s["context_len"], s["kv_cache"]): s for s in summary}
    print(f"\n{'mode':5} {'ctx':>5} {'prefill ms':>10} {'decode ms':>9} {'tok/s':>7} {'tok/s no KV':>11} "
          f"{'KV x':>6} {'peak MB':>8} {'weights MB':>10} {'ppl':>8} {'ppl +%':>7}")
    for (mode, n, kv), s in sorted(at.items(), key=lambda item: (PRECISION_ORDER.index(item[0][0]), item[0][1])):
        if not kv:
            continue
        off = at.get((mode, n, False), {}).get("decode_tokens_s", float("nan"))
        ppl, delta = report[mode]["ppl"] or float("nan"), report[mode]["ppl_degradation_pct"]
        print(f"{mode:5} {n:5d} {s['prefill_ms']:10.1f} {s['decode_ms']:9.1f} {s['decode_tokens_s']:7.1f} {off:11.2f} "
              f"{s['decode_tokens_s'] / off:6.1f} {s['peak_mem_mb']:8.0f} {s['weight_mb']:10.1f} {ppl:8.2f} "
              f"{delta if delta is not None else float('nan'):7.2f}")
    for mode, reason in report["skipped"].items():
        print(f"{mode:5} skipped: {reason}")


def run_modes(grid: dict, args: argparse.Namespace, model_path: Path) -> tuple[list[dict], dict]:
    """Every mode in turn, each in a fresh process; returns all timed rows and each mode's end event."""
    from tqdm import tqdm

    runs_per_mode = len(grid["context_lengths"]) * sum(
        c["warmup_runs"] + c["num_prompts"] * c["timed_runs"] for c in (run_counts(grid, kv) for kv in grid["kv_cache"]))
    rows, ends = [], {}
    with tqdm(total=runs_per_mode * len(grid["modes"]), desc="bench", unit="step", file=sys.stderr) as bar:
        for mode in grid["modes"]:
            bar.set_postfix_str(mode)
            mode_rows, end = run_mode(mode, args, model_path, bar)
            ends[mode] = end
            if end["event"] == "done":   # a mode that failed half way keeps none of its rows
                rows += [{**r, "dtype": end["dtype"], "weight_mb": end["weight_mb"], "device": end["device"],
                          "model": model_path.name, "seed": grid["seed"]} for r in mode_rows]
            bar.total = bar.n + runs_per_mode * (len(grid["modes"]) - len(ends))
    return rows, ends


def main() -> None:
    args = parse_args()
    grid = load_grid(args.grid, args.profile, args.modes)
    if args.worker:
        return run_worker(args.worker, grid, args)
    start = time.perf_counter()
    model_path = build_shape_model(args.model_shape, args.model_path, args.shape_dir) if args.model_shape else args.model_path
    rows, ends = run_modes(grid, args, model_path)
    summary = summarize(rows)
    report = build_report(summary, ends, grid, args, model_path.name)
    files = write_outputs(args.out, rows, summary, report)
    print_table(summary, report)
    top, modes = max(grid["context_lengths"]), [m for m in grid["modes"] if m in report]
    print(json.dumps({"profile": args.profile, "wall_s": round(time.perf_counter() - start, 1), "device": report["device"],
                      "num_timed_runs": len(rows), f"tokens_s_{top}": {m: report[m][f"tokens_s_{top}"] for m in modes},
                      "ppl": {m: report[m]["ppl"] for m in modes}, "skipped": report["skipped"],
                      "files": [str(f) for f in files]}))


if __name__ == "__main__":
    main()
