"""The comparison's workloads, each 32 fixed chats with an explicit system message (so every server
builds the same prompt) and 64 output tokens: `chat`, short questions of 34-48 tokens (mean 40)
with the chat template; `shared-prefix`, the same questions after a long system prompt that
every request shares (a reference document from WikiText-2); `copy`, requests whose answer copies
their input (proofread or summarize a WikiText paragraph, edit a function and return it whole);
`long-prompt`, summarize a whole 1,100-word WikiText article (1,411 prompt tokens on average, each its own).
And the closed loop that sends them: `num_users` threads, each sending its next request when its
last one is answered, until `num_requests` were sent or `send_cap_s` passed; a request still open
at `cut_cap_s` is abandoned (its connection closed). Knows nothing about which server answers."""

import functools
import itertools
import threading
import time
from collections.abc import Callable

import requests
from urllib3.exceptions import ReadTimeoutError

from benchmarks.workload import CHAT_QUESTIONS, CODE_REQUESTS, CODE_SNIPPETS, WIKITEXT, load_articles

OUTPUT_TOKENS = 64
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
PROMPTS = CHAT_QUESTIONS + CODE_REQUESTS + (   # 26 shared with the load test, 6 more: 32
    "What is the water cycle, and why does it matter for life?",
    "How does a bicycle stay upright when it is moving forward?",
    "Why do cats purr, and what does it usually mean?",
    "What should I pack for a weekend hiking trip in the mountains?",
    "Give me a short recipe for a simple tomato pasta sauce.",
    "How do vaccines help the human body fight off infections?",
)


WORKLOADS = ("chat", "shared-prefix", "copy", "long-prompt")
# tokens a request of the workload may need (prompt and answer): llama-server's context per slot
CONTEXT_TOKENS = {"chat": 256, "shared-prefix": 1024, "copy": 256, "long-prompt": 2048}
TEXT_TASKS = ("Proofread this text and return it corrected, in full:", "Summarize this text:")
CODE_TASKS = ("Add type hints to this Python code and return the whole code:",
              "Rename the variables of this Python code to clearer names and return the whole code:")


@functools.cache
def workload(name: str) -> tuple[str, tuple[str, ...]]:
    """A workload's system message and the user messages used in turn (WikiText-2 read on first use)."""
    if name == "chat":
        return SYSTEM, PROMPTS
    if name == "shared-prefix":
        reference = " ".join(load_articles(WIKITEXT / "test.txt", num_words=350)[0].split())
        return f"{SYSTEM}. Use this reference text when it helps:\n\n{reference}", PROMPTS
    if name == "copy":
        paragraphs = load_articles(WIKITEXT / "test.txt", num_words=60)[1:17]
        texts = [f"{TEXT_TASKS[n % 2]}\n\n{text}" for n, text in enumerate(paragraphs)]
        code = [f"{CODE_TASKS[k % 2]}\n\n{CODE_SNIPPETS[k % 3].format(k=k)}" for k in range(16)]
        return SYSTEM, tuple(texts + code)
    if name == "long-prompt":
        articles = load_articles(WIKITEXT / "test.txt", num_words=1100)[:32]
        return SYSTEM, tuple(f"{TEXT_TASKS[1]}\n\n{text}" for text in articles)
    raise ValueError(f"workload must be one of {WORKLOADS}, got {name!r}")


def messages(i: int, name: str = "chat") -> list[dict]:
    """The chat of request number i of a workload (its prompts are used in turn)."""
    system, prompts = workload(name)
    return [{"role": "system", "content": system}, {"role": "user", "content": prompts[i % len(prompts)]}]


def send(url: str, body: dict, part: Callable[[str], dict | None], deadline: float) -> dict:
    """One request on a new connection (keep-alive would race servers that close idle ones), timed:
    latency, time to the first streamed text, the answer's usage (completion tokens); `part`
    parses one line of a streamed answer (body["stream"])."""
    record = {"start": time.perf_counter(), "ttft_s": None, "completion_tokens": 0, "error": None,
              "is_abandoned": False}
    try:
        timeout = (10, max(deadline - record["start"], 0.1))
        with requests.post(url, json=body, stream=body["stream"], timeout=timeout,
                           headers={"Connection": "close"}) as r:
            if r.status_code != 200:
                record["error"] = f"{r.status_code} {r.text[:300]}"
            elif body["stream"]:
                for line in r.iter_lines(decode_unicode=True):
                    parsed = part(line)
                    if parsed and parsed["text"] and record["ttft_s"] is None:
                        record["ttft_s"] = time.perf_counter() - record["start"]
                    if parsed and parsed["usage"]:
                        record["usage"] = parsed["usage"]
                    if time.perf_counter() > deadline:
                        raise TimeoutError
            else:
                record["usage"] = r.json()["usage"]
            record["completion_tokens"] = record.get("usage", {}).get("completion_tokens", 0)
    except (requests.Timeout, TimeoutError):
        record["is_abandoned"] = True
    except (requests.RequestException, ValueError, KeyError) as e:
        # requests raises a read timeout on a plain answer as ConnectionError(ReadTimeoutError)
        is_timeout = isinstance(e, requests.ConnectionError) and e.args and isinstance(e.args[0], ReadTimeoutError)
        record["is_abandoned"] = bool(is_timeout)
        record["error"] = None if is_timeout else repr(e)[:300]
    record["end"] = time.perf_counter()
    return record


def closed_loop(send_one: Callable[[int, float], dict], num_users: int, num_requests: int, send_cap_s: float,
                cut_cap_s: float) -> list[dict]:
    """Records of every request sent; send_one(i, deadline) sends request number i and abandons it
    at the deadline."""
    counter = itertools.count()
    records: list[dict] = []
    start = time.perf_counter()

    def user() -> None:
        while time.perf_counter() < start + send_cap_s and (i := next(counter)) < num_requests:
            records.append(send_one(i, start + cut_cap_s))

    threads = [threading.Thread(target=user) for _ in range(num_users)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return records
