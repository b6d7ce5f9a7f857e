"""Start or stop TorchServe with this repo's config and wait until the model answers.

    python scripts/serve.py start    # background; prints the endpoint and a curl example
    python scripts/serve.py stop
The tests and the tooling run their own server on other ports through TorchServeProcess.
"""

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TMP, LOGS = ROOT / "build" / "ts-tmp", ROOT / "logs"    # of the server `make serve` starts


def torchserve_env(tmp: Path, logs: Path) -> dict:
    """This venv's binaries first; TorchServe's temp files, worker sockets and logs where we say;
    torch.compile's cache and the built w4 kernel in one place for every server, so each is built once."""
    return {"TORCHINDUCTOR_CACHE_DIR": str(ROOT / "build" / "torchinductor"),
            "TORCH_EXTENSIONS_DIR": str(ROOT / "build" / "torch_extensions"), **os.environ,
            "PATH": f"{BIN}:{os.environ['PATH']}", "TMPDIR": str(tmp), "LOG_LOCATION": str(logs),
            "METRICS_LOCATION": str(logs)}


def http_json(url: str, method: str = "GET", timeout: float = 10, body: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data, {"Content-Type": "application/json"} if data else {}, method=method)
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read() or b"null")


def wait_ready(mgmt_url: str, model: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Until every worker of `model` is READY (TorchServe answers before the worker has loaded)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"TorchServe exited with {proc.returncode}; see its logs")
        try:
            workers = http_json(f"{mgmt_url}/models/{model}", timeout=5)[0]["workers"]
            last = [w["status"] for w in workers]
            if workers and all(s == "READY" for s in last):
                return
        except Exception as e:  # not up yet
            last = repr(e)
        time.sleep(1)
    raise TimeoutError(f"model {model} not ready after {timeout:.0f}s (last status: {last})")


class TorchServeProcess:
    """A TorchServe in the foreground as a child process, with its own ports, temp dir and logs."""

    def __init__(self, workdir: Path, port: int, models: str = "llm=llm.mar", model_store: Path = ROOT / "model_store",
                 env: dict | None = None) -> None:
        self.workdir = Path(workdir).resolve()
        self.port = port
        self.inference_url = f"http://127.0.0.1:{port}"
        self.management_url = f"http://127.0.0.1:{port + 1}"
        self.metrics_url = f"http://127.0.0.1:{port + 2}"
        self.models = models
        self.model_store = model_store
        self.env = env or {}
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 300) -> "TorchServeProcess":
        for spec in self.models.split(","):       # a stale archive would be measured under this git SHA
            if "=" in spec and (source := newer_source(Path(self.model_store) / spec.split("=", 1)[1])):
                raise ValueError(f"{spec.split('=', 1)[1]} is older than {source.relative_to(ROOT)}: rebuild it (make mar)")
        for port in range(self.port, self.port + 5):   # else another server's API would answer in place of ours
            if self._is_listening(port):
                raise ValueError(f"port {port} on 127.0.0.1 is in use; pick free ports")
        self.workdir.mkdir(parents=True, exist_ok=True)
        tmp = self.workdir / "tmp"
        tmp.mkdir(exist_ok=True)
        props = (ROOT / "config" / "config.properties").read_text().splitlines()
        overrides = {"inference_address": self.inference_url, "management_address": self.management_url,
                     "metrics_address": self.metrics_url, "grpc_inference_port": self.port + 3,
                     "grpc_management_port": self.port + 4, "model_store": str(self.model_store),
                     "load_models": self.models, "metrics_config": str(ROOT / "config" / "metrics.yaml"),
                     # worker sockets live in java.io.tmpdir: a private one keeps two servers apart
                     "vmargs": f"-Djava.io.tmpdir={tmp}"}
        lines = [p for p in props if p.split("=", 1)[0].strip() not in overrides]
        lines += [f"{k}={v}" for k, v in overrides.items()]
        config = self.workdir / "config.properties"
        config.write_text("\n".join(lines) + "\n")
        env = {**torchserve_env(tmp, self.workdir / "logs"), **self.env}
        self.log = open(self.workdir / "torchserve.out", "w")
        self.proc = subprocess.Popen([str(BIN / "torchserve"), "--foreground", "--ncs", "--ts-config", str(config)],
                                     cwd=self.workdir, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        try:   # a server given up on is stopped: left running, it took cores from whatever ran next
            while not self._is_listening(self.port + 1):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"TorchServe did not come up; see {self.workdir / 'torchserve.out'}")
                time.sleep(0.5)
            for spec in self.models.split(","):
                if spec and spec != "ALL":
                    wait_ready(self.management_url, spec.split("=")[0], timeout, self.proc)
        except BaseException:
            self.stop()
            raise
        return self

    def _is_listening(self, port: int) -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", port)) == 0

    def stop(self) -> None:
        if self.proc:
            stop_process_group(self.proc)
            self.log.close()


def newer_source(mar: Path) -> Path | None:
    """A source the archive carries (handler code, model-config.yaml) changed after `mar` was built, or None."""
    if not mar.exists():
        return None
    sources = [*(ROOT / "handler").rglob("*.py"), *(ROOT / "handler").rglob("*.cpp"), ROOT / "config" / "model-config.yaml"]
    return next((p for p in sources if p.stat().st_mtime > mar.stat().st_mtime), None)


def stop_process_group(proc: subprocess.Popen, timeout: float = 30) -> None:
    """End a child started with start_new_session=True and all it started: SIGTERM, then SIGKILL.
    Returns once the whole group is gone (the child may exit before its Java server lets go of
    its ports, and the next server on them would find them in use)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    with contextlib.suppress(ProcessLookupError):
        while time.monotonic() < deadline + 10:          # bounded: an unreaped zombie stays in the group
            proc.poll()                                  # reap the child, so the group can empty
            os.killpg(proc.pid, 0)                       # ProcessLookupError: none of the group is left
            if time.monotonic() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
            time.sleep(0.2)
    proc.wait()


def start() -> None:
    TMP.mkdir(parents=True, exist_ok=True)
    try:
        http_json("http://127.0.0.1:8081/models/llm", timeout=2)
        print("TorchServe is already running; `make stop` first to restart it")
    except Exception:
        LOGS.mkdir(exist_ok=True)
        with open(LOGS / "torchserve.out", "a") as log:
            subprocess.run([str(BIN / "torchserve"), "--start", "--ncs", "--ts-config", "config/config.properties"],
                           cwd=ROOT, env=torchserve_env(TMP, LOGS), stdout=log, stderr=subprocess.STDOUT, check=True)
    wait_ready("http://127.0.0.1:8081", "llm", timeout=300)
    print("llm is ready: http://127.0.0.1:8080/predictions/llm")
    print("""try:
  curl -s http://127.0.0.1:8080/predictions/llm -H 'Content-Type: application/json' \\
       -d '{"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_new_tokens": 32}'""")


def stop() -> None:
    subprocess.run([str(BIN / "torchserve"), "--stop"], cwd=ROOT, env=torchserve_env(TMP, LOGS), check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["start", "stop"])
    args = parser.parse_args()
    start() if args.action == "start" else stop()


if __name__ == "__main__":
    main()
