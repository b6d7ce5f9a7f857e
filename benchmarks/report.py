"""What a benchmark run reports, all from the rows its workers sent: medians per configuration,
the per-mode report (metrics/final_report.json), every run in benchmarks/results.csv, the
figures and the printed table. Measures nothing."""

import json
import statistics
from collections import defaultdict
from pathlib import Path

from benchmarks import plots
from benchmarks.tables import format_table, write_csv
from llmserve.config import QUANTIZATION_MODES   # fp32 first: the perplexity baseline is the first that ran

METRICS = ("prefill_ms", "decode_ms", "decode_tokens_s", "total_ms", "peak_mem_mb")
COLUMNS = ("mode", "context_len", "kv_cache", "template", "prompt_index", "run_index", "prompt_tokens",
           "new_tokens", *METRICS, "weight_mb", "dtype", "device", "model", "seed")
TABLE = (("mode", "mode", "{}"), ("context_len", "ctx", "{}"), ("prefill_ms", "prefill ms", "{:.1f}"),
         ("decode_ms", "decode ms", "{:.1f}"), ("decode_tokens_s", "tok/s", "{:.1f}"),
         ("tokens_s_no_cache", "tok/s no KV", "{:.2f}"), ("kv_speedup", "KV x", "{:.1f}"),
         ("peak_mem_mb", "peak MB", "{:.0f}"), ("weight_mb", "weights MB", "{:.1f}"), ("ppl", "ppl", "{:.2f}"),
         ("ppl_degradation_pct", "ppl +%", "{:.2f}"))


def summarize(rows: list[dict]) -> list[dict]:
    """Medians of the timed runs per configuration (mode, context length, KV cache)."""
    groups = defaultdict(list)
    for r in rows:
        groups[(r["mode"], r["context_len"], r["kv_cache"])].append(r)
    return [{"mode": m, "context_len": n, "kv_cache": kv, "num_runs": len(g), "weight_mb": g[0]["weight_mb"],
             **{k: statistics.median(r[k] for r in g) for k in METRICS}} for (m, n, kv), g in groups.items()]


def build_report(summary: list[dict], ends: dict, grid: dict, profile: str, model: str, machine: dict) -> dict:
    """Per mode that ran: speed, memory and perplexity by context length; then what the run was."""
    at = {(s["mode"], s["context_len"], s["kv_cache"]): s for s in summary}
    done = {m: e for m, e in ends.items() if e["event"] == "done"}
    baseline = next((m for m in QUANTIZATION_MODES if m in done and done[m]["ppl"]), None)
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
    device = next((e["device"] for e in done.values()), "none ran")
    return {**report, "device": device, "model": model, "profile": profile, "grid": grid,
            "memory": "torch.cuda.max_memory_allocated" if device.startswith("cuda") else "peak resident set of the process",
            "baseline_mode": baseline, "skipped": {m: e["reason"] for m, e in ends.items() if e["event"] == "skipped"},
            "machine": machine}


def table(summary: list[dict], report: dict) -> str:
    """KV cache on, one line per mode and context length, with the cache-off speed beside it."""
    at = {(s["mode"], s["context_len"], s["kv_cache"]): s for s in summary}
    rows = []
    on = sorted((s for s in summary if s["kv_cache"]), key=lambda s: (QUANTIZATION_MODES.index(s["mode"]), s["context_len"]))
    for s in on:
        off = at.get((s["mode"], s["context_len"], False), {}).get("decode_tokens_s")
        rows.append({**s, "tokens_s_no_cache": off, "kv_speedup": s["decode_tokens_s"] / off if off else None,
                     **{k: report[s["mode"]][k] for k in ("ppl", "ppl_degradation_pct")}})
    return "\n".join([format_table(rows, TABLE), *(f"{m} skipped: {why}" for m, why in report["skipped"].items())])


def write_outputs(out: Path, rows: list[dict], summary: list[dict], report: dict) -> list[Path]:
    for d in ("benchmarks", "metrics", "figures"):
        (out / d).mkdir(parents=True, exist_ok=True)
    machine = report["machine"]
    write_csv([{**{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}, **machine} for r in rows],
              out / "benchmarks" / "results.csv", [*COLUMNS, *machine])
    (out / "metrics" / "final_report.json").write_text(json.dumps(report, indent=2) + "\n")
    figures = plots.write_figures(summary, report, out / "figures", out / "benchmarks" / "report.html")
    return [out / "benchmarks" / "results.csv", out / "metrics" / "final_report.json", *figures]
