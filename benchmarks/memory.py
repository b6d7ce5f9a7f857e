"""Peak memory, sampled one way for every measurement. Of this process: on a GPU the allocator's
max_memory_allocated; on a CPU the kernel's resident high-water mark (VmHWM), reset between runs.
Of other processes (a server's workers): a thread that sums their resident sets. Knows nothing
about models or servers."""

import ctypes
import gc
import os
import threading
import time
from collections.abc import Callable

import psutil


class PeakMemory:
    """Peak bytes between reset() (or entering the with block) and read_bytes(). pids, when given,
    names the processes to watch, asked again at every sample so that a restarted one is followed;
    their children count too. Where the kernel cannot reset VmHWM, this process is sampled too.
    keep: also keep every sample as (seconds since entering, MiB) in .samples (the soak's series)."""

    def __init__(self, device: str = "cpu", pids: Callable[[], list[int]] | None = None,
                 interval_s: float = 0.002, keep: bool = False) -> None:
        self.device, self.pids, self.interval_s = device, pids, interval_s
        self.samples: list[tuple[float, float]] | None = [] if keep else None
        self.is_cuda = str(device).startswith("cuda")
        self.can_reset_hwm = pids is None and not self.is_cuda and reset_hwm()
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._sampler = None if self.is_cuda or self.can_reset_hwm else threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> "PeakMemory":
        self.reset()
        if self._sampler:
            self._sampler.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._sampler:
            self._sampler.join()

    def _sample(self) -> None:
        start = time.monotonic()
        while not self._stop.wait(self.interval_s):
            try:
                procs = [psutil.Process(pid) for pid in (self.pids() if self.pids else [os.getpid()])]
                procs += [child for p in procs for child in p.children(recursive=True)]
                rss = sum(p.memory_info().rss for p in procs)
                self.peak_bytes = max(self.peak_bytes, rss)
                if self.samples is not None:
                    self.samples.append((round(time.monotonic() - start, 1), round(rss / 2**20, 1)))
            except (OSError, psutil.Error, KeyError, IndexError):
                pass   # a worker restarting, or its server busy: skip this sample

    def reset(self) -> None:
        if self.is_cuda:
            import torch

            torch.cuda.synchronize(self.device)
            return torch.cuda.reset_peak_memory_stats(self.device)
        if self.pids is None:   # hand freed heap back to the OS, so one run's peak does not leak into the next
            gc.collect()
            try:
                ctypes.CDLL(None).malloc_trim(0)     # glibc
            except (AttributeError, OSError):
                pass
        self.peak_bytes = 0
        if self.can_reset_hwm:
            reset_hwm()

    def read_bytes(self) -> int:
        if self.is_cuda:
            import torch

            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        if self.can_reset_hwm:
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
        return self.peak_bytes


def reset_hwm() -> bool:
    """Reset this process's resident high-water mark to its resident set (Linux 4.0 and later)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
