"""WikiText-2 perplexity of the quantization modes through the engine's own forward: w8/w4 with
the packed kernels at every size (packed_max_rows past any window), i.e. the weights a decode
step of few sequences reads; and, for w4, the largest gap between each 4-bit layer's weights
and its float ones after quantize_w4's round trip (0 when the float weights sit on a 4-bit
grid, as the default model's Q4_1 weights do). A fixed slice: the first --tokens tokens of
data/wikitext-2/test.txt, in windows of --window with stride --stride. Writes
benchmarks/results/quality.json; the last line printed is one JSON object.

    python -m benchmarks.quality --modes bf16 w8 w4
"""

import argparse
import json
import time
from pathlib import Path

from benchmarks.machine import ROOT, describe
from benchmarks.measure import engine_loss, perplexity, perplexity_ids
from benchmarks.tables import format_table
from benchmarks.workload import WIKITEXT
from llmserve.config import EngineConfig
from llmserve.engine import Engine
from llmserve.quantize import ALWAYS_PACKED, PackedLinear, dequantize_w4, quantize_w4


def w4_grid_error(model) -> float | None:
    """Largest |weight - dequantize(quantize_w4(weight))| over the 4-bit layers (None: none)."""
    layers = [m for m in model.modules() if isinstance(m, PackedLinear) and m.bits == 4]
    errors = [(dequantize_w4(*quantize_w4(m.weight)) - m.weight.float()).abs().max().item() for m in layers]
    return max(errors, default=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", default=["bf16", "w8", "w4"])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--stride", type=int, default=256)
    parser.add_argument("--model-path", default=str(ROOT / "models" / "smollm2-135m-instruct"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "quality.json")
    args = parser.parse_args()

    rows = []
    for mode in args.modes:
        engine = Engine.from_config(EngineConfig(model_path=args.model_path, quantization=mode, max_num_seqs=1,
                                                 max_model_len=args.window, packed_max_rows=ALWAYS_PACKED))
        ids = perplexity_ids(engine.tokenizer, (WIKITEXT / "test.txt").read_text(), args.tokens)
        t0 = time.perf_counter()
        ppl = perplexity(engine_loss(engine), ids, args.window, args.stride, engine.facts.device)
        rows.append({"mode": mode, "perplexity": ppl, "seconds": time.perf_counter() - t0,
                     "w4_grid_error": w4_grid_error(engine.runner.model)})
        print(format_table(rows[-1:], (("mode", "mode", "{}"), ("perplexity", "perplexity", "{:.4f}"))), flush=True)
    base = rows[0]["perplexity"]
    for row in rows:
        row["change_pct"] = 100 * (row["perplexity"] / base - 1)
    columns = (("mode", "mode", "{}"), ("perplexity", "perplexity", "{:.4f}"),
               ("change_pct", f"vs {rows[0]['mode']} %", "{:+.2f}"), ("w4_grid_error", "w4 grid error", "{:.1e}"),
               ("seconds", "s", "{:.0f}"))
    print(format_table(rows, columns))
    report = {"machine": describe(), "slice": {"file": "data/wikitext-2/test.txt", "tokens": args.tokens,
              "window": args.window, "stride": args.stride}, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps({r["mode"]: round(r["perplexity"], 4) for r in rows}))


if __name__ == "__main__":
    main()
