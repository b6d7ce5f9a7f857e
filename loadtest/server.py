"""The sweep's side of a running TorchServe (scripts.serve.TorchServeProcess): models registered
and unregistered per batch configuration through the management API, their worker processes, and
warm-up requests. Knows nothing about Locust."""

import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

from loadtest.chargeback import scrape
from scripts.serve import TorchServeProcess, http_json, wait_ready


def register(server: TorchServeProcess, mar: str, name: str, batch_size: int, max_batch_delay: int,
             handler: str = "", timeout: float = 600) -> None:
    """API values beat the .mar's model-config.yaml, so every configuration is the one we ask for;
    handler (e.g. llm_handler:request_level) replaces the archive's entry point."""
    params = {"url": mar, "model_name": name, "batch_size": batch_size, "max_batch_delay": max_batch_delay,
              "initial_workers": 1, "synchronous": "true"}
    if handler:
        params["handler"] = handler
    query = urllib.parse.urlencode(params)
    http_json(f"{server.management_url}/models?{query}", method="POST", timeout=timeout)
    wait_ready(server.management_url, name, timeout, server.proc)
    described = http_json(f"{server.management_url}/models/{name}")[0]
    if (described["batchSize"], described["maxBatchDelay"]) != (batch_size, max_batch_delay):
        raise RuntimeError(f"{name} registered with batchSize={described['batchSize']} "
                           f"maxBatchDelay={described['maxBatchDelay']}, not {batch_size}/{max_batch_delay}")


def unregister(server: TorchServeProcess, name: str) -> None:
    http_json(f"{server.management_url}/models/{name}", method="DELETE", timeout=120)


def worker_pids(server: TorchServeProcess, name: str) -> list[int]:
    return [int(w["pid"]) for w in http_json(f"{server.management_url}/models/{name}")[0]["workers"] if w.get("pid")]


def warm_up(server: TorchServeProcess, name: str, num_requests: int, num_rounds: int = 2,
            max_new_tokens: int = 16) -> None:
    """num_rounds bursts of num_requests short requests: the first two calls of a fresh worker
    are several times slower than the rest on this CPU, and must not land in the timed run."""
    body = {"messages": [{"role": "user", "content": "Say hello."}], "max_new_tokens": max_new_tokens}
    with ThreadPoolExecutor(num_requests) as pool:
        for _ in range(num_rounds):
            list(pool.map(lambda _: http_json(f"{server.inference_url}/predictions/{name}", "POST", 600, body),
                          range(num_requests)))


def wait_idle(server: TorchServeProcess, timeout_s: float = 180) -> None:
    """Until the handler's gauges say no request runs or waits: the requests a Locust run left
    unanswered at its end (their clients gone) must not share the engine with the next run's."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        values = scrape(f"{server.metrics_url}/metrics", ("llm_requests_running{", "llm_requests_waiting{")).values()
        if values and not any(values):
            return
        time.sleep(1)
    raise TimeoutError(f"requests still in the engine after {timeout_s} s")
