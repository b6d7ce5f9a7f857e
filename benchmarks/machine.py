"""The machine and software a result was measured on, recorded in every result file: CPU model,
cores, memory, OS, Python and package versions, the git commit (-dirty: with uncommitted changes)
and the UTC date. Imports torch only to name the device a benchmark ran on."""

import os
import platform
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("torch", "transformers", "bitsandbytes", "torchserve", "locust", "onnxruntime")


def command_output(*cmd: str) -> str:
    """What a command prints, or "" where it cannot run."""
    try:
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def cpu_model() -> str:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else command_output("lscpu")
    names = [line.split(":", 1)[1].strip() for line in info.splitlines() if line.lower().startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


def describe() -> dict:
    versions = {str(d.metadata["Name"]).lower(): d.version for d in metadata.distributions()}
    return {"cpu": cpu_model(), "num_cores": os.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1), "os": platform.platform(),
            "python": platform.python_version(), **{p: versions.get(p, "not installed") for p in PACKAGES},
            "git_sha": command_output("git", "describe", "--always", "--dirty", "--abbrev=40", "--exclude=*") or "unknown",
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def device_name(device) -> str:
    """The torch device a benchmark ran on, in words."""
    import torch

    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
