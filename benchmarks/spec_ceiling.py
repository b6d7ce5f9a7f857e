"""How far prompt lookup can take a workload on this machine, and what holds it there. On the
archive's engine (model-config.yaml's handler: section, one process, one request at a time):
each prompt answered twice, drafting and not, taking turns (greedy: the same tokens, checked);
a verify step's time at 1..spec_max_rows rows of one sequence; and replays of the answers through
the engine's own PromptLookup: the archive's draft policy, and an oracle that drafts exactly the
tokens the model then keeps (the most any choice of draft lengths gets from these drafts). A replay's
decode time is the sum of its steps' verify times; its speed-up is over one-token steps for the same
tokens, and end to end the answers' measured first-token time is added to both (each prompt is
answered twice, so the second answer finds it in the prefix cache: shorter than a served one). Writes
benchmarks/results/spec-ceiling/spec_ceiling.{json,md}.

    python -m benchmarks.spec_ceiling --workloads copy chat
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks.machine import ROOT, describe
from benchmarks.tables import format_table, write_report
from compare.systems import archive_engine_config
from compare.workload import OUTPUT_TOKENS, messages, workload
from llmserve.config import EngineConfig
from llmserve.engine import Engine
from llmserve.request import parse_request
from llmserve.speculative import PromptLookup, accepted_length

COLUMNS = (("workload", "workload", "{}"), ("answers", "answers", "{}"), ("tokens", "tokens after the first", "{}"),
           ("steps", "steps (archive policy)", "{}"), ("oracle_steps", "steps (oracle)", "{}"),
           ("kept", "drafted tokens kept", "{:.1%}"), ("replay_matches", "replay drafts as the engine", "{}"),
           ("measured_decode_x", "measured decode x", "{:.2f}"),
           ("modeled_decode_x", "modeled decode x", "{:.2f}"), ("oracle_decode_x", "oracle decode x", "{:.2f}"),
           ("ttft_ms", "first token ms", "{:.1f}"), ("measured_x", "measured x", "{:.2f}"),
           ("modeled_x", "modeled x", "{:.2f}"), ("oracle_x", "oracle x", "{:.2f}"))
ROW_COLUMNS = (("rows", "rows", "{}"), ("ms", "verify step ms", "{:.2f}"), ("vs_one", "x a one-row step", "{:.2f}"))


def request(engine: Engine, tag: str, chat: list[dict]):
    """The greedy request the server would make of this chat (OUTPUT_TOKENS at most)."""
    return parse_request(tag, {"messages": chat, "max_new_tokens": OUTPUT_TOKENS}, engine.config, engine.tokenizer)


def answer(engine: Engine, chat: list[dict], tag: str, max_rows: int) -> dict:
    """One greedy answer, drafting in steps of up to max_rows rows (1: not drafting)."""
    engine.spec_max_rows = max_rows
    r = request(engine, tag, chat)
    t0 = time.perf_counter()
    engine.add_request(r)
    while not r.is_finished:
        engine.step()
    ms = (time.perf_counter() - t0) * 1000
    return {"prompt": r.prompt_ids, "output": r.output_ids, "ms": ms, "ttft_ms": (r.first_token_time - t0) * 1000,
            "drafted": r.num_draft_tokens, "kept": r.num_accepted_tokens}


def verify_ms(engine: Engine, chat: list[dict], max_rows: int, reps: int) -> dict[int, float]:
    """Median time of runner.verify over one sequence's last token and W - 1 more, W = 1..max_rows
    (the widths taking turns), after the chat's prefill; the row's length put back after each. Its
    LM head is the one the engine takes for this greedy request (argmax rows, runner._logits). The
    engine's own work around a step (drafting, bookkeeping) is not in it."""
    r = request(engine, "verify", chat)
    engine.add_request(r)
    engine.step()
    cache, times = engine.cache, {w: [] for w in range(1, max_rows + 1)}
    length = int(cache.row_lengths[0])
    for _ in range(reps):
        for w in times:
            t0 = time.perf_counter()
            engine.runner.verify(torch.tensor([r.prompt_ids[-w:]]), [r.lm_head])
            times[w].append((time.perf_counter() - t0) * 1000)
            cache.lengths[0], cache.row_lengths[0] = length, length
    engine.abort(r.request_id)
    return {w: statistics.median(ts) for w, ts in times.items()}


def replay(ids: list[int], output: list[int], config: EngineConfig, max_rows: int, oracle: bool) -> list[tuple]:
    """(rows, draft tokens kept) of each step after the first token of one answer: drafts from
    PromptLookup as the engine takes them (the archive's policy), or (oracle) each draft as long as
    it can be, cut to what the model keeps."""
    lookup = PromptLookup(config.spec_tokens, config.spec_lookup_min, config.spec_lookup_max)   # starts at its longest
    steps, n = [], 1
    while n < len(output):
        draft = lookup.draft(ids + output[:n], min(max_rows - 1, OUTPUT_TOKENS - n - 1))
        kept = accepted_length(draft, output[n:n + len(draft)] + [None])
        if oracle:
            draft = draft[:kept]
        elif draft:
            lookup.kept(len(draft), kept)
        steps.append((1 + len(draft), kept))
        n += kept + 1
    return steps


def measure(engine: Engine, name: str, row_ms: dict[int, float]) -> dict:
    config, max_rows = engine.config, max(row_ms)
    on, off = [], []
    for i in range(len(workload(name)[1])):   # drafting first, then not, then the other way round
        for rows in (max_rows, 1) if i % 2 == 0 else (1, max_rows):
            (on if rows > 1 else off).append(answer(engine, messages(i, name), f"{name}-{i}-{rows}", rows))
    assert all(a["output"] == b["output"] for a, b in zip(on, off)), "drafting changed a greedy answer"
    tokens = sum(len(a["output"]) - 1 for a in off)
    one_row = tokens * row_ms[1]
    steps = [s for a in off for s in replay(a["prompt"], a["output"], config, max_rows, oracle=False)]
    oracle = [s for a in off for s in replay(a["prompt"], a["output"], config, max_rows, oracle=True)]
    modeled = sum(row_ms[w] for w, _ in steps)
    best = sum(row_ms[w] for w, _ in oracle)
    ttft = sum(a["ttft_ms"] for a in off + on) / 2          # the answers' in all: the mean of the two runs'
    decode_on, decode_off = (sum(a["ms"] - a["ttft_ms"] for a in runs) for runs in (on, off))
    # the replay of the archive's policy drafts and keeps what the engine did: a check on the model
    engine_drafts = (sum(a["drafted"] for a in on), sum(a["kept"] for a in on))
    replayed_drafts = (sum(w - 1 for w, _ in steps), sum(k for _, k in steps))
    return {"workload": name, "answers": len(off), "tokens": tokens, "steps": len(steps),
            "oracle_steps": len(oracle), "kept": engine_drafts[1] / max(engine_drafts[0], 1),
            "engine_drafted_kept": engine_drafts, "replayed_drafted_kept": replayed_drafts,
            "replay_matches": engine_drafts == replayed_drafts,
            "measured_decode_x": decode_off / decode_on, "modeled_decode_x": one_row / modeled,
            "oracle_decode_x": one_row / best, "ttft_ms": ttft / len(off),
            "measured_x": sum(a["ms"] for a in off) / sum(a["ms"] for a in on),
            "modeled_x": (ttft + one_row) / (ttft + modeled), "oracle_x": (ttft + one_row) / (ttft + best)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", default=["copy", "chat"])
    parser.add_argument("--reps", type=int, default=30, help="verify steps timed at each width")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "spec-ceiling")
    args = parser.parse_args()

    engine = Engine.from_config(EngineConfig.from_dict(archive_engine_config()))
    assert engine.config.spec_tokens > 0, "the archive does not draft (spec_tokens: 0)"
    max_rows = engine.spec_max_rows
    answer(engine, messages(0, args.workloads[0]), "warm-up", max_rows)
    row_ms = verify_ms(engine, messages(1, args.workloads[0]), max_rows, args.reps)
    rows = [{"rows": w, "ms": ms, "vs_one": ms / row_ms[1]} for w, ms in row_ms.items()]
    print(format_table(rows, ROW_COLUMNS), flush=True)
    results = [measure(engine, name, row_ms) for name in args.workloads]
    print(format_table(results, COLUMNS))

    report = {"machine": describe(), "config": {k: getattr(engine.config, k) for k in (
                  "quantization", "spec_tokens", "spec_max_rows", "spec_lookup_min", "spec_lookup_max")},
              "verify_ms": rows, "workloads": results}
    write_report(args.out, "spec_ceiling", report, "benchmarks.spec_ceiling",
                 format_table(rows, ROW_COLUMNS, markdown=True) + "\n\n" + format_table(results, COLUMNS, markdown=True),
                 f"; the archive's engine: {json.dumps(report['config'])}")
    print(json.dumps({"out": str(args.out), "workloads": [r["workload"] for r in results]}))


if __name__ == "__main__":
    main()
