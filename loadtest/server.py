"""The sweep's side of TorchServe: one loopback server (scripts.serve starts it), models
registered and unregistered per batch configuration through the management API, warm-up
requests, and a sampler of the worker processes' resident memory. Knows nothing about Locust."""

import json
import socket
import threading
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil

from scripts.serve import TorchServeProcess, http_json, wait_ready


def start_server(workdir: Path, port: int, model_store: Path) -> TorchServeProcess:
    """TorchServe on 127.0.0.1 ports port..port+4 (inference, management, metrics, two gRPC)
    with no model loaded; returns once the management API listens."""
    for p in range(port, port + 5):   # else another server's API would answer in place of ours
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", p)) == 0:
                raise ValueError(f"port {p} on 127.0.0.1 is in use; pick free ports with --port")
    return TorchServeProcess(workdir.resolve(), port, models="", model_store=model_store.resolve()).start()


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
    body = json.dumps({"messages": [{"role": "user", "content": "Say hello."}],
                       "max_new_tokens": max_new_tokens}).encode()

    def post(_):
        req = urllib.request.Request(f"{server.inference_url}/predictions/{name}", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as resp:
            return json.loads(resp.read())

    with ThreadPoolExecutor(num_requests) as pool:
        for _ in range(num_rounds):
            list(pool.map(post, range(num_requests)))


class PeakRSS:
    """Samples the resident memory of a model's worker processes (and their children) in a thread
    until stopped; peak_bytes is the largest sum seen."""

    def __init__(self, server: TorchServeProcess, name: str, interval_s: float = 0.5) -> None:
        self.server, self.name, self.interval_s = server, name, interval_s
        self.peak_bytes = 0
        self.num_samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [psutil.Process(pid) for pid in worker_pids(self.server, self.name)]
                procs += [child for p in procs for child in p.children(recursive=True)]
                rss = sum(p.memory_info().rss for p in procs)
                self.peak_bytes = max(self.peak_bytes, rss)
                self.num_samples += 1
            except (OSError, psutil.Error, KeyError, IndexError):
                pass   # a worker restarting, or the API busy: skip this sample
            self._stop.wait(self.interval_s)
