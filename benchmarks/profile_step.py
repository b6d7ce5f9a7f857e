"""Where an engine step's time goes: the prefill step and decode steps at 1, 16 and 64 sequences
(chat prompts of ~40 tokens), timed plainly and then under torch.profiler, self time summed by part
of the model (PARTS). A decode step at few sequences is bound by reading the weights, at many by
arithmetic; the split names what to attack next. w8/w4 run twice: eager and with their packed-kernel
steps compiled. Writes benchmarks/results/profile/profile.{json,md}; the last line printed is JSON.

    python -m benchmarks.profile_step --modes bf16 w4 --batch-sizes 1 16 64
"""

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.machine import ROOT, describe
from benchmarks.tables import format_table, write_report
from benchmarks.workload import CHAT_QUESTIONS
from llmserve.config import EngineConfig
from llmserve.engine import Engine
from llmserve.quantize import WEIGHT_ONLY_MODES
from llmserve.request import parse_request

PARTS = (   # (part, substrings of aten op / profiler event names), first match wins
    # a compiled layer's fused kernels, its wrapper and guard checks (events outside aten::), or our
    # C++ decoder step (all layers, their products included)
    ("fused", ("CompiledFxGraph", "Torch-Compiled Region", "TorchDynamo Cache Lookup", "Pregraph bytecode",
               "AOTDispatcher", "decode_layers")),
    ("attention", ("bmm", "softmax", "masked_fill", "scaled_dot_product", "flash_attention")),
    ("linear", ("_weight_int4pack_mm", "_weight_int8pack_mm", "q4_mm", "q8_mm", "mkl_mm", "addmm", "aten::mm", "linear",
                "matmul")),
    ("kv_write", ("index_put",)),
    ("norm", ("rms_norm",)),
    ("sampling", ("argmax", "sort", "multinomial", "searchsorted", "cumsum")),
)
COLUMNS = (("mode", "mode", "{}"), ("compiled", "compiled", "{}"), ("batch", "seqs", "{}"), ("phase", "phase", "{}"), ("step_ms", "step ms", "{:.1f}"),
           ("tok_s", "tok/s", "{:.1f}"), *((f"{p}_ms", f"{p} ms", "{:.1f}") for p, _ in PARTS),
           ("other_ms", "other ms", "{:.1f}"), ("ops", "aten calls/step", "{:.0f}"))


def split(prof, num_steps: int) -> dict:
    """Self CPU ms per step by part, and ATen (and our kernels') calls per step (nested calls count too)."""
    ms = {f"{p}_ms": 0.0 for p, _ in PARTS} | {"other_ms": 0.0}
    ops = 0
    for event in prof.key_averages():
        part = next((p for p, keys in PARTS if any(k in event.key for k in keys)), "other")
        if event.key.startswith(("aten::", "llmserve::")) or part == "fused":
            ms[f"{part}_ms"] += event.self_cpu_time_total / 1000 / num_steps
            ops += event.count if part != "fused" else 0
    return ms | {"ops": ops / num_steps}


def run_steps(engine: Engine, batch: int, num_decode: int, tag: str, wrap) -> tuple:
    """A prefill step, one untimed decode step, then num_decode decode steps; each timed part
    inside wrap() (the profiler, or nothing). Returns (prefill ms, decode ms a step, the two wraps)."""
    for i in range(batch):
        body = {"messages": [{"role": "user", "content": CHAT_QUESTIONS[i % len(CHAT_QUESTIONS)]}],
                "max_new_tokens": 2 * num_decode + 8, "ignore_eos": True}
        engine.add_request(parse_request(f"{tag}-{i}", body, engine.config, engine.tokenizer))
    with wrap() as prefill_part:
        t0 = time.perf_counter()
        engine.step()
        prefill_ms = (time.perf_counter() - t0) * 1000
    engine.step()
    with wrap() as decode_part:
        t0 = time.perf_counter()
        for _ in range(num_decode):
            engine.step()
        decode_ms = (time.perf_counter() - t0) * 1000 / num_decode
    for rid in list(engine.requests):
        engine.abort(rid)
    return prefill_ms, decode_ms, prefill_part, decode_part


def measure(engine: Engine, batch: int, num_decode: int) -> list[dict]:
    """Timings from plain steps (no profiler overhead), the split by part from profiled ones."""
    prefill_ms, decode_ms, _, _ = run_steps(engine, batch, num_decode, "plain", contextlib.nullcontext)
    *_, prefill_prof, decode_prof = run_steps(engine, batch, num_decode, "profiled",
                                              lambda: profile(activities=[ProfilerActivity.CPU]))
    return [{"batch": batch, "phase": "prefill", "step_ms": prefill_ms, **split(prefill_prof, 1)},
            {"batch": batch, "phase": "decode", "step_ms": decode_ms, "tok_s": batch * 1000 / decode_ms,
             **split(decode_prof, num_decode)}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", default=["bf16", "w4"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 16, 64])
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--model-path", default=str(ROOT / "models" / "smollm2-135m-instruct"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "profile")
    args = parser.parse_args()

    rows, facts = [], {}
    for mode in args.modes:
        for compiled in (False, True) if mode in WEIGHT_ONLY_MODES else (False,):   # before and after fusion
            engine = Engine.from_config(EngineConfig(model_path=args.model_path, quantization=mode,
                                                     max_num_seqs=max(args.batch_sizes), compile=compiled,
                                                     kv_prefault=True))   # as the archive: no page faults timed
            name = f"{mode}{' compiled' * compiled}"
            facts[name] = {
                "dtype": str(engine.facts.dtype), "packed_max_rows": engine.facts.packed_max_rows,
                "kernel_ms": engine.facts.kernel_ms, "weight_mb": round(engine.facts.weight_bytes / 1e6, 1),
                "compiled_graphs": engine.facts.compiled_graphs}
            graphs = engine.runner.compiled_graphs()
            measure(engine, 1, 2)                         # warm-up: kernels' first-call set-up
            for batch in args.batch_sizes:
                rows += [{"mode": mode, "compiled": compiled, **row} for row in measure(engine, batch, args.decode_steps)]
                print(format_table(rows[-2:], COLUMNS), flush=True)
            facts[name]["graphs_built_while_measuring"] = engine.runner.compiled_graphs() - graphs   # 0: no storm
            del engine

    report = {"machine": describe(), "torch_threads": torch.get_num_threads(), "facts": facts, "rows": rows}
    write_report(args.out, "profile", report, "benchmarks.profile_step", format_table(rows, COLUMNS, markdown=True),
                 f"; {report['torch_threads']} torch threads")
    print(format_table(rows, COLUMNS))
    print(json.dumps({"out": str(args.out), "rows": len(rows)}))


if __name__ == "__main__":
    main()
