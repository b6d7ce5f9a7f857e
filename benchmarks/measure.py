"""Measures one loaded model in this process: timed greedy generation with our engine's KV cache
and without any cache, and strided perplexity. Knows nothing about prompts, memory, the grid,
processes, reports or figures."""

import math
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from llmserve.request import Request, SamplingParams


# -- timed runs: perf_counter, read only once the device is done ----------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timings(prefill_ms: float, decode_ms: float, total_ms: float, num_new_tokens: int) -> dict:
    return {"prefill_ms": prefill_ms, "decode_ms": decode_ms, "total_ms": total_ms,
            "new_tokens": num_new_tokens,
            "decode_tokens_s": (num_new_tokens - 1) / decode_ms * 1000 if decode_ms > 0 else float("nan")}


def run_cached(engine, request_id: str, prompt_ids: list[int], max_new_tokens: int) -> dict:
    """One request through our engine (its own KV cache). The engine stamps the first and last
    token with perf_counter right after copying the token to the host, i.e. after a device sync."""
    request = Request(request_id=request_id, prompt_ids=list(prompt_ids),
                      params=SamplingParams(max_new_tokens=max_new_tokens))
    synchronize(engine.facts.device)
    request.arrival_time = time.perf_counter()
    engine.generate([request])
    synchronize(engine.facts.device)
    total_ms = (time.perf_counter() - request.arrival_time) * 1000
    return timings((request.first_token_time - request.arrival_time) * 1000,
                   (request.finish_time - request.first_token_time) * 1000, total_ms, len(request.output_ids))


@torch.inference_mode()
def run_uncached(model, prompt_ids: list[int], max_new_tokens: int, device: torch.device) -> dict:
    """Greedy decoding with no cache at all: every new token re-runs the forward over the whole
    sequence (use_cache=False); logits only for the last position, as the engine computes them."""
    ids = list(prompt_ids)
    synchronize(device)
    t0 = time.perf_counter()
    for i in range(max_new_tokens):
        logits = model(torch.tensor([ids], device=device), use_cache=False, logits_to_keep=1).logits  # [1, 1, V]
        ids.append(int(logits[0, -1].argmax()))   # the step's one device-to-host copy
        if i == 0:
            t_first = time.perf_counter()
    t_end = time.perf_counter()      # int() above waited for the device
    return timings((t_first - t0) * 1000, (t_end - t_first) * 1000, (t_end - t0) * 1000, max_new_tokens)


# -- perplexity ----------------------------------------------------------------------------------
def perplexity_ids(tokenizer, text: str, max_tokens: int | None) -> list[int]:
    """The text's token ids, only the first max_tokens of them unless that is None."""
    ids = tokenizer(text[:max_tokens * 8] if max_tokens else text, add_special_tokens=False)["input_ids"]
    return ids[:max_tokens] if max_tokens else ids      # 8 characters a token leaves room to spare


def num_windows(num_tokens: int, window: int, stride: int) -> int:
    return max(1, math.ceil((num_tokens - window) / stride) + 1) if num_tokens > window else 1


def engine_loss(engine):
    """perplexity()'s model interface (x, labels) -> .loss over the engine's own forward, so the
    loss is what the engine computes (its kernels and fused layers), not Hugging Face's forward.
    Uses KV row 0: the engine must be idle and hold a window (max_model_len)."""
    def loss(x: torch.Tensor, labels: torch.Tensor, use_cache: bool = False) -> SimpleNamespace:
        logits = engine.runner.prefill(slice(0, 1), [x[0].tolist()], all_positions=True)   # [1, T, V]
        return SimpleNamespace(loss=F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100))
    return loss


@torch.inference_mode()
def perplexity(model, ids: list[int], window: int, stride: int, device: torch.device, on_window=None) -> float:
    """Strided sliding window (the transformers perplexity guide): each window of `window` tokens
    scores only the tokens the previous window did not, so every token after the first window is
    predicted from at least window - stride tokens of context."""
    if not 0 < stride <= window:
        raise ValueError(f"perplexity stride must be in (0, window={window}], got {stride}")
    total_nll, num_scored, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        x = torch.tensor([ids[begin:end]], device=device)                # [1, T]
        labels = x.clone()
        labels[:, :-(end - prev_end)] = -100                             # already scored: context only
        loss = model(x, labels=labels, use_cache=False).loss             # mean over shifted labels
        n = int((labels[:, 1:] != -100).sum())
        total_nll += float(loss) * n
        num_scored += n
        prev_end = end
        if on_window is not None:
            on_window()
        if end == len(ids):
            break
    return math.exp(total_nll / num_scored)
