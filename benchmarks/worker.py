"""One quantization mode of the benchmark, in a process of its own so that one mode's memory never
shows in another's: loads the model with the handler's own code (llmserve.load), times every run
of the grid, then scores WikiText-2 perplexity. Sends each event as a dict down a pipe; knows
nothing about the other modes, files or printing."""

import dataclasses
from multiprocessing.connection import Connection
from pathlib import Path

import torch
import transformers

from benchmarks import measure
from benchmarks.machine import device_name
from benchmarks.memory import PeakMemory
from benchmarks.profiles import run_counts
from benchmarks.shapes import RANDOM_MARKER
from benchmarks.workload import WIKITEXT, exact_prompt
from llmserve.config import EngineConfig
from llmserve.engine import Engine
from llmserve.load import load_model
from llmserve.quantize import ALWAYS_PACKED


def run(mode: str, grid: dict, model_path: Path, options: dict, events: Connection) -> None:
    """Events: plan (how many progress steps follow), run (one warm-up or timed run), window (one
    perplexity window), and last done, or skipped where this device cannot run the mode.
    options: the EngineConfig's device and num_threads."""
    def emit(event: str, **fields) -> None:
        events.send({"event": event, **fields})

    transformers.logging.set_verbosity_error()
    torch.manual_seed(grid["seed"])
    lengths, max_new, ppl = grid["context_lengths"], grid["max_new_tokens"], grid["perplexity"]
    packed = grid.get("packed_max_rows", -1)      # "always": w8/w4 take the packed kernels in prefills too
    config = EngineConfig(model_path=str(model_path), quantization=mode, max_num_seqs=1,
                          max_model_len=max(max(lengths) + max_new, ppl["window"]), max_prefill_tokens=max(lengths),
                          max_new_tokens_cap=max_new, default_max_new_tokens=max_new,
                          packed_max_rows=ALWAYS_PACKED if packed == "always" else packed, **options)
    try:
        model, tokenizer, facts = load_model(config)
    except ValueError as e:       # this device cannot run this mode
        return emit("skipped", reason=str(e))
    # no stop tokens: every run decodes exactly max_new_tokens, whatever the text says
    engine = Engine(model, tokenizer, config, dataclasses.replace(facts, stop_token_ids=frozenset()))
    wiki = (WIKITEXT / "test.txt").read_text()
    is_random = (model_path / RANDOM_MARKER).is_file()     # its perplexity would mean nothing
    ppl_ids = [] if is_random else measure.perplexity_ids(tokenizer, wiki, ppl["max_tokens"])
    emit("plan", num_steps=measure.num_windows(len(ppl_ids), ppl["window"], ppl["stride"]) if ppl_ids else 0)

    with PeakMemory(facts.device) as peak:
        for length in lengths:
            prompts = [exact_prompt(tokenizer, wiki, i, length) for i in range(grid["num_prompts"])]
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
    # through the engine's own forward (its kernels and fused layers), not Hugging Face's
    value = measure.perplexity(measure.engine_loss(engine), ppl_ids, ppl["window"], ppl["stride"], facts.device,
                               on_window=lambda: emit("window")) if ppl_ids else None
    emit("done", ppl=value, ppl_tokens=len(ppl_ids), weight_mb=facts.weight_bytes / 2**20, dtype=str(facts.dtype),
         device=device_name(facts.device))
