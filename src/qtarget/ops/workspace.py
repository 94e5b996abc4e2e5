"""Buffers that every chunk of one engine call reuses.

A chunk's temporaries are `[c, V]` float32 tensors of ~100 MiB (c = 544, V = 49,152). Allocated
afresh per chunk, each one costs more than the arithmetic done on it: on CPU glibc serves blocks
above its mmap threshold (at most 32 MiB) with a new mapping and returns them to the system when
freed, so every chunk page-faults its buffers in again (measured on this project's CPU: ~90 ms to
first-touch one 107 MB buffer, against ~35 ms for a softmax over it and ~600 ms for the logits GEMM
that fills it). A `Workspace` lives for one pass over the chunks and hands out the same storage to
each chunk by name, so the buffers are mapped once per call instead of once per chunk. On CUDA the
caching allocator already reuses blocks; the workspace costs nothing there either.

Still, each call maps its buffers once. On Linux, CPU buffers of 4 MiB and more are advised to use
transparent huge pages (`madvise(MADV_HUGEPAGE)`, what PyTorch's own THP_MEM_ALLOC_ENABLE=1 does for
every allocation): one fault per 2 MiB instead of per 4 KiB, 23 ms instead of ~80 ms to first-touch
a 107 MB buffer here. Where THP is off ("never") or the call fails, nothing changes.

The contract: a buffer taken under a name is valid until the same name is taken again (the next
chunk); nothing that outlives a chunk may keep a view of one.
"""
from __future__ import annotations

import ctypes
import sys

import torch
from torch import Tensor

HUGE_PAGE = 2 * 2**20
MADV_HUGEPAGE = 14  # Linux
_madvise: list = []  # [libc.madvise or None], resolved on first use


def advise_huge_pages(t: Tensor) -> bool:
    """Ask Linux to back the 2 MiB-aligned interior of CPU tensor `t` with transparent huge pages
    (before first touch). True if the advice was taken; never raises."""
    if t.device.type != "cpu" or not sys.platform.startswith("linux"):
        return False
    if not _madvise:
        try:
            fn = ctypes.CDLL(None, use_errno=True).madvise
            fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
            _madvise.append(fn)
        except (OSError, AttributeError):
            _madvise.append(None)
    if _madvise[0] is None:
        return False
    ptr = t.data_ptr()
    start = (ptr + HUGE_PAGE - 1) // HUGE_PAGE * HUGE_PAGE
    end = (ptr + t.numel() * t.element_size()) // HUGE_PAGE * HUGE_PAGE
    return end > start and _madvise[0](start, end - start, MADV_HUGEPAGE) == 0


class Workspace:
    """Named 2-D buffers, grown on demand; `take(name, rows, cols, dtype)` returns the first `rows`
    rows (contiguous) of the buffer under `name`."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self._buffers: dict[str, Tensor] = {}

    def take(self, name: str, rows: int, cols: int, dtype: torch.dtype) -> Tensor:
        buf = self._buffers.get(name)
        if buf is None or buf.shape[0] < rows or buf.shape[1] != cols or buf.dtype != dtype:
            buf = torch.empty((rows, cols), dtype=dtype, device=self.device)
            if buf.numel() * buf.element_size() >= 2 * HUGE_PAGE:
                advise_huge_pages(buf)
            self._buffers[name] = buf
        return buf[:rows]

    def like(self, name: str, t: Tensor) -> Tensor:
        """A buffer with `t`'s [rows, cols] shape and dtype."""
        return self.take(name, t.shape[0], t.shape[1], t.dtype)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())


def scratch(workspace: Workspace | None, name: str, like: Tensor) -> Tensor:
    """An uninitialised [rows, cols] tensor like `like`: the workspace's buffer `name` when there is
    a workspace, else a fresh one (kernels called on their own, e.g. in tests)."""
    if workspace is None:
        return torch.empty(like.shape, dtype=like.dtype, device=like.device)
    return workspace.like(name, like)
