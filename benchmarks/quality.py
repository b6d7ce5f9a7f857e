"""WikiText-2 perplexity of the quantization modes as their kernels compute it: float modes with
their own weights; w8/w4 with every projection and the LM head through the packed kernels
(Hugging Face's forward calls the unfused q/k/v and gate/up layers, so those are packed here
too, and the float path is switched off). A fixed slice: the first --tokens tokens of
data/wikitext-2/test.txt, in windows of --window with stride --stride. Writes
benchmarks/results/quality.json; the last line printed is one JSON object.

    python -m benchmarks.quality --modes bf16 w8 w4
"""

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks.machine import ROOT, describe
from benchmarks.measure import perplexity, perplexity_ids
from benchmarks.tables import format_table
from benchmarks.workload import WIKITEXT
from llmserve.config import EngineConfig
from llmserve.load import load_model
from llmserve.quantize import WEIGHT_ONLY_MODES, pack_linears


def packed_everywhere(model, mode: str) -> None:
    """Pack the layers Hugging Face's forward calls, and take the packed kernels at any size."""
    for layer in model.model.layers:
        layer.self_attn.qkv_proj = layer.mlp.gate_up_proj = None
    for packed in pack_linears(model, mode):
        packed.max_packed_rows = 1 << 30


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
        weight_only = mode in WEIGHT_ONLY_MODES
        config = EngineConfig(model_path=args.model_path, quantization="fp32" if weight_only else mode)
        model, tokenizer, facts = load_model(config)
        if weight_only:
            packed_everywhere(model, mode)
        ids = perplexity_ids(tokenizer, (WIKITEXT / "test.txt").read_text(), args.tokens)
        t0 = time.perf_counter()
        ppl = perplexity(model, ids, args.window, args.stride, facts.device)
        rows.append({"mode": mode, "perplexity": ppl, "seconds": time.perf_counter() - t0})
        print(format_table(rows[-1:], (("mode", "mode", "{}"), ("perplexity", "perplexity", "{:.4f}"))), flush=True)
    base = rows[0]["perplexity"]
    for row in rows:
        row["change_pct"] = 100 * (row["perplexity"] / base - 1)
    columns = (("mode", "mode", "{}"), ("perplexity", "perplexity", "{:.4f}"),
               ("change_pct", f"vs {rows[0]['mode']} %", "{:+.2f}"), ("seconds", "s", "{:.0f}"))
    print(format_table(rows, columns))
    report = {"machine": describe(), "slice": {"file": "data/wikitext-2/test.txt", "tokens": args.tokens,
              "window": args.window, "stride": args.stride}, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps({r["mode"]: round(r["perplexity"], 4) for r in rows}))


if __name__ == "__main__":
    main()
