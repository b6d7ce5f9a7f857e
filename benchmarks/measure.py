"""Measures one loaded model in this process: prompts cut to exact token lengths, timed greedy
generation with our engine's KV cache and without any cache, peak memory around each run, and
strided perplexity. Knows nothing about the grid file, subprocesses, reports or figures."""

import ctypes
import gc
import math
import os
import platform
import threading
import time

import torch

from llmserve.request import Request, SamplingParams

TEMPLATES = ("chat", "code", "summary")
CHAT_TOPICS = ("how a CPU cache works", "the causes of the French Revolution", "photosynthesis",
               "how vaccines train the immune system", "the rules of chess", "why the sky is blue",
               "how a compiler turns code into machine instructions", "the water cycle")
CODE_SNIPPETS = (
    "def scale_{k}(values):\n    total = 0\n    for v in values:\n        total += v * {k}\n    return total\n\n",
    "class Counter{k}:\n    def __init__(self):\n        self.counts = {{}}\n\n    def add(self, key):\n"
    "        self.counts[key] = self.counts.get(key, 0) + {k}\n\n",
    "def find_{k}(items, target):\n    for i, item in enumerate(items):\n        if item == target:\n"
    "            return i + {k}\n    return -1\n\n",
)


# -- prompts ----------------------------------------------------------------------------------------
def make_prompt(tokenizer, wiki: str, index: int, length: int) -> tuple[str, list[int]]:
    """Prompt `index` of a length: its template (cycling through TEMPLATES) and exactly `length`
    token ids. The head is cut to fit; the tail (what the model answers) is always kept whole."""
    template = TEMPLATES[index % len(TEMPLATES)]
    start = wiki.find("\n", (index * 7919 * 8) % max(1, len(wiki) - length * 8)) + 1
    article = wiki[start:start + length * 8]       # WikiText averages ~4 characters per token
    if template == "chat":
        head = f"User: Explain {CHAT_TOPICS[index % len(CHAT_TOPICS)]}. Here is some background:\n{article}"
        tail = "\nAssistant:"
    elif template == "code":
        head = "# A small module of helpers.\n\n" + "".join(
            CODE_SNIPPETS[(index + k) % len(CODE_SNIPPETS)].format(k=index * 100 + k) for k in range(length // 20 + 1))
        tail = "\ndef quicksort(arr):\n    "
    elif template == "summary":
        head = f"Summarize the following article:\n\n{article}"
        tail = "\n\nSummary:"
    else:
        raise ValueError(f"unknown template {template!r}")
    tail_ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
    head_ids = tokenizer(head, add_special_tokens=False)["input_ids"][:length - len(tail_ids)]
    assert len(head_ids) + len(tail_ids) == length, f"{template} head too short for {length} tokens"
    return template, head_ids + tail_ids


# -- clocks and memory ---------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def mark(device: torch.device):
    """A point in time: a recorded CUDA event on a GPU, perf_counter elsewhere."""
    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def elapsed_ms(start, end) -> float:
    if isinstance(start, float):
        return (end - start) * 1000
    end.synchronize()
    return start.elapsed_time(end)


class PeakMemory:
    """Peak memory of this process between reset() and read_bytes(). GPU: max_memory_allocated.
    CPU: the kernel's resident high-water mark (VmHWM), reset through /proc/self/clear_refs after
    freed heap is handed back to the OS, so one run's peak does not leak into the next; where the
    kernel does not allow that, a thread samples the resident set every few milliseconds."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.can_reset_hwm = device.type == "cpu" and _write_clear_refs()
        self.sampled_peak = 0
        if device.type == "cpu" and not self.can_reset_hwm:
            import psutil
            self.process = psutil.Process()
            threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while True:
            self.sampled_peak = max(self.sampled_peak, self.process.memory_info().rss)
            time.sleep(0.002)

    def reset(self) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        gc.collect()
        try:
            ctypes.CDLL(None).malloc_trim(0)     # glibc: return freed heap pages to the OS
        except (AttributeError, OSError):
            pass
        if self.can_reset_hwm:
            _write_clear_refs()
        else:
            self.sampled_peak = self.process.memory_info().rss

    def read_bytes(self) -> int:
        if self.device.type == "cuda":
            synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        if self.can_reset_hwm:
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
        return max(self.sampled_peak, self.process.memory_info().rss)


def _write_clear_refs() -> bool:
    """Reset the resident high-water mark to the current resident set (Linux 4.0 and later)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    return f"cpu: {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


# -- timed runs ----------------------------------------------------------------------------------
def timings(prefill_ms: float, decode_ms: float, total_ms: float, num_new_tokens: int) -> dict:
    return {"prefill_ms": prefill_ms, "decode_ms": decode_ms, "total_ms": total_ms,
            "new_tokens": num_new_tokens,
            "decode_tokens_s": (num_new_tokens - 1) / decode_ms * 1000 if decode_ms > 0 else float("nan")}


def run_cached(engine, request_id: str, prompt_ids: list[int], max_new_tokens: int) -> dict:
    """One request through our engine (its own KV cache). The engine stamps the first and last
    token with perf_counter right after copying the token to the host, i.e. after a device sync."""
    device = engine.facts.device
    request = Request(request_id=request_id, prompt_ids=list(prompt_ids),
                      params=SamplingParams(max_new_tokens=max_new_tokens))
    synchronize(device)
    start = mark(device)
    request.arrival_time = time.perf_counter()
    engine.generate([request])
    total_ms = elapsed_ms(start, mark(device))
    return timings((request.first_token_time - request.arrival_time) * 1000,
                   (request.finish_time - request.first_token_time) * 1000, total_ms, len(request.output_ids))


@torch.inference_mode()
def run_uncached(model, prompt_ids: list[int], max_new_tokens: int, device: torch.device) -> dict:
    """Greedy decoding with no cache at all: every new token re-runs the forward over the whole
    sequence (use_cache=False); logits only for the last position, as the engine computes them."""
    ids = list(prompt_ids)
    synchronize(device)
    start = mark(device)
    t0 = time.perf_counter()
    for i in range(max_new_tokens):
        logits = model(torch.tensor([ids], device=device), use_cache=False, logits_to_keep=1).logits  # [1, 1, V]
        ids.append(int(logits[0, -1].argmax()))   # the step's one device-to-host copy
        if i == 0:
            t_first = time.perf_counter()
    t_end = time.perf_counter()
    total_ms = elapsed_ms(start, mark(device))
    return timings((t_first - t0) * 1000, (t_end - t_first) * 1000, total_ms, max_new_tokens)


# -- perplexity ----------------------------------------------------------------------------------
def perplexity_ids(tokenizer, text: str, max_tokens: int | None) -> list[int]:
    """The text's token ids, only the first max_tokens of them unless that is None."""
    ids = tokenizer(text[:max_tokens * 8] if max_tokens else text, add_special_tokens=False)["input_ids"]
    return ids[:max_tokens] if max_tokens else ids      # 8 characters a token leaves room to spare


def num_windows(num_tokens: int, window: int, stride: int) -> int:
    return max(1, math.ceil((num_tokens - window) / stride) + 1) if num_tokens > window else 1


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
