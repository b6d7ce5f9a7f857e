"""Measures one variant of the model, in a process of its own so that no variant's memory shows in
another's: output tokens/s of one stream and of a batch decoded together (greedy, exactly
max_new_tokens, EOS ignored, prefill included), peak resident memory while generating, weight
bytes and WikiText-2 test perplexity. A variant is the engine (a model directory in one of its
quantization modes) or an ONNX file run by ONNX Runtime."""

import dataclasses
import statistics
import time
from pathlib import Path

import torch

from benchmarks import measure
from benchmarks.memory import PeakMemory
from benchmarks.workload import WIKITEXT, exact_prompt


def engine_runner(variant: dict, settings: dict):
    """(generate(prompts, max_new) -> answers, the perplexity model, weight bytes, tokenizer)."""
    from llmserve.config import EngineConfig
    from llmserve.engine import Engine
    from llmserve.load import load_model
    from llmserve.request import Request, SamplingParams

    window = settings["perplexity"]["window"]
    config = EngineConfig(model_path=str(variant["model_dir"]), quantization=variant["mode"],
                          compile=variant["mode"] in ("w8", "w4"), max_num_seqs=settings["batch_size"],
                          max_model_len=max(settings["prompt_tokens"] + settings["max_new_tokens"], window),
                          max_prefill_tokens=max(settings["batch_size"] * settings["prompt_tokens"], window),
                          max_new_tokens_cap=settings["max_new_tokens"],
                          default_max_new_tokens=settings["max_new_tokens"], device="cpu")
    model, tokenizer, facts = load_model(config)
    engine = Engine(model, tokenizer, config, dataclasses.replace(facts, stop_token_ids=frozenset()))

    def generate(prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        requests = [Request(request_id=str(i), prompt_ids=list(p), params=SamplingParams(max_new_tokens=max_new_tokens))
                    for i, p in enumerate(prompts)]
        return [r.output_ids for r in engine.generate(requests)]
    return generate, measure.engine_loss(engine), facts.weight_bytes, tokenizer


def onnx_runner(variant: dict, settings: dict):
    from transformers import AutoConfig, AutoTokenizer

    from optlab.onnx_model import OrtModel

    model = OrtModel(variant["path"], AutoConfig.from_pretrained(variant["model_dir"], local_files_only=True))
    return (model.greedy, model.loss, Path(variant["path"]).stat().st_size,
            AutoTokenizer.from_pretrained(variant["model_dir"], local_files_only=True))


def timed(generate, prompts: list[list[int]], max_new_tokens: int) -> tuple[float, list[list[int]]]:
    """Output tokens/s of one generate() call and its answers."""
    start = time.perf_counter()
    answers = generate(prompts, max_new_tokens)
    seconds = time.perf_counter() - start
    assert all(len(a) == max_new_tokens for a in answers), "a variant stopped early"
    return sum(map(len, answers)) / seconds, answers


def run(variant: dict, settings: dict) -> dict:
    torch.manual_seed(settings["seed"])
    if variant["kind"] == "engine":
        generate, loss, weight_bytes, tokenizer = engine_runner(variant, settings)
    elif variant["kind"] == "onnx":
        generate, loss, weight_bytes, tokenizer = onnx_runner(variant, settings)
    else:
        raise ValueError(f"variant kind must be engine or onnx, got {variant['kind']!r}")
    wiki = (WIKITEXT / "test.txt").read_text()
    prompts = [exact_prompt(tokenizer, wiki, i, settings["prompt_tokens"])[1] for i in range(settings["batch_size"])]
    max_new = settings["max_new_tokens"]
    with PeakMemory("cpu") as peak:
        generate(prompts[:1], 4)                                            # warm-up
        single = [timed(generate, [p], max_new) for p in prompts[:settings["num_prompts"]]]
        batched, _ = timed(generate, prompts, max_new)
        peak_bytes = peak.read_bytes()
    ppl = settings["perplexity"]
    ppl_ids = measure.perplexity_ids(tokenizer, wiki, ppl["max_tokens"])
    return {"tokens_s_single": statistics.median(t for t, _ in single), "tokens_s_batch": batched,
            "weight_mb": weight_bytes / 2**20, "peak_mb": peak_bytes / 2**20,
            "ppl": measure.perplexity(loss, ppl_ids, ppl["window"], ppl["stride"], torch.device("cpu")),
            "ppl_tokens": len(ppl_ids), "answers": [a[0] for _, a in single]}
