"""Single-request latency and decode speed for each quantization mode, in process (no HTTP).

For each mode: load the engine, warm up once, then time one greedy request of a fixed chat
prompt with max_new_tokens tokens. Decode tokens/s counts tokens 2..N over the time after the
first token (prefill excluded). One run each: a quick comparison, not a benchmark (see bench.py).
Run: python scripts/measure_modes.py [--modes fp32 bf16 ...] [--max-new-tokens 64]
"""

import argparse
import gc
import json
import time

import torch

from benchmarks.machine import ROOT, describe
from benchmarks.tables import format_table
from llmserve.config import QUANTIZATION_MODES, EngineConfig
from llmserve.engine import Engine
from llmserve.request import parse_request

PROMPT = {"messages": [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]}
COLUMNS = tuple((c, c, "{}") for c in ("mode", "weight_mb", "prompt_tokens", "new_tokens", "ttft_ms", "latency_ms",
                                       "decode_tokens_s"))


def measure(mode: str, model_path: str, max_new_tokens: int) -> dict:
    config = EngineConfig(model_path=model_path, quantization=mode, max_num_seqs=1, max_model_len=512)
    t0 = time.perf_counter()
    engine = Engine.from_config(config)
    load_s = time.perf_counter() - t0
    engine.generate([parse_request("warmup", {**PROMPT, "max_new_tokens": 4}, config, engine.tokenizer)])
    r = parse_request("timed", {**PROMPT, "max_new_tokens": max_new_tokens}, config, engine.tokenizer)
    engine.generate([r])
    n = len(r.output_ids)
    return {
        "mode": mode, "load_s": round(load_s, 1), "weight_mb": round(engine.facts.weight_bytes / 2**20, 1),
        "prompt_tokens": len(r.prompt_ids), "new_tokens": n, "ttft_ms": round((r.first_token_time - r.arrival_time) * 1000, 1),
        "latency_ms": round((r.finish_time - r.arrival_time) * 1000, 1),
        "decode_tokens_s": round((n - 1) / (r.finish_time - r.first_token_time), 1) if n > 1 else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", default=list(QUANTIZATION_MODES), choices=QUANTIZATION_MODES)
    parser.add_argument("--model-path", default=str(ROOT / "models/smollm2-135m-instruct"))
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()
    rows = []
    for mode in args.modes:
        try:
            rows.append(measure(mode, args.model_path, args.max_new_tokens))
        except ValueError as e:
            rows.append({"mode": mode, "skipped": str(e)})
        gc.collect()
        print(rows[-1], flush=True)
    print("\n" + format_table(rows, COLUMNS, markdown=True))
    print(json.dumps({"machine": describe(), "threads": torch.get_num_threads(), "results": rows}))


if __name__ == "__main__":
    main()
