"""The KV cache: one row per running sequence, preallocated, written in place. Rows are kept
compact (running sequences hold rows 0..n-1) so a decode step reads one contiguous slice; a
finished or preempted sequence's row is refilled by moving the last row into it, which touches
only that row: the other sequences' cache is never recomputed."""

import mmap
import math

import numpy as np
import torch


def zeros(shape: tuple, dtype: torch.dtype, device: torch.device, prefault: bool = False) -> torch.Tensor:
    """Zeros on the CPU that take memory only as rows are used (numpy's zeros come from calloc,
    whose untouched pages stay unmapped), or with prefault all mapped now: a first touch page by
    page in a step can cost more than the step itself on a VM. Prefaulted, in 2 MiB pages where the
    kernel gives them (transparent huge pages, asked for by madvise): a 64-row decode step reads
    each row's keys and values, ~9 KiB a head 786 KiB apart, and 4 KiB pages made most reads a TLB
    miss (timings in 216e425's message), else by the kernel in one call (MAP_POPULATE).
    Zeros, not empty: masked positions must hold finite values (0 * NaN is NaN in attention)."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    itemsize = torch.empty((), dtype=dtype).element_size()
    np_dtype = {1: np.uint8, 2: np.int16, 4: np.int32}[itemsize]
    if prefault and hasattr(mmap, "MADV_HUGEPAGE"):
        pages = mmap.mmap(-1, math.prod(shape) * itemsize, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        pages.madvise(mmap.MADV_HUGEPAGE)
        raw = np.frombuffer(pages, dtype=np_dtype)
        raw[::mmap.PAGESIZE // itemsize] = 0      # one write a page faults every page in (a huge one where given)
        raw = raw.reshape(shape)
    elif prefault and hasattr(mmap, "MAP_POPULATE"):
        pages = mmap.mmap(-1, math.prod(shape) * itemsize,
                          flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE)
        raw = np.frombuffer(pages, dtype=np_dtype).reshape(shape)
    else:
        raw = np.zeros(shape, dtype=np_dtype)
    return torch.from_numpy(raw).view(dtype)


class KVCache:
    def __init__(self, num_layers: int, num_rows: int, num_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, prefault: bool = False) -> None:
        shape = (num_layers, num_rows, num_kv_heads, max_len, head_dim)   # [L, S, H, T, D]
        self.k = zeros(shape, dtype, device, prefault)
        self.v = zeros(shape, dtype, device, prefault)
        self.max_len = max_len
        # per row: cache positions written so far, and how many of the first are left padding
        self.lengths = torch.zeros(num_rows, dtype=torch.long, device=device)     # [S]
        self.starts = torch.zeros(num_rows, dtype=torch.long, device=device)      # [S]
        self.last_tokens = torch.zeros(num_rows, dtype=torch.long, device=device) # [S] next decode input
        self.row_lengths = np.zeros(num_rows, dtype=np.int64)  # the same on the host: sizes a step without a sync
        self.positions = torch.arange(max_len, device=device)                     # [T]

    def move_row(self, src: int, dst: int) -> None:
        n = int(self.row_lengths[src])
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]
        for t in (self.lengths, self.starts, self.last_tokens):
            t[dst] = t[src]
        self.row_lengths[dst] = n

    def set_prefilled(self, rows: slice, length: int, starts: torch.Tensor) -> None:
        self.lengths[rows] = length
        self.starts[rows] = starts
        self.row_lengths[rows] = length

    def advance(self, num_rows: int) -> None:
        """Each of rows 0..num_rows-1 took one more token."""
        self.lengths[:num_rows] += 1
        self.row_lengths[:num_rows] += 1
