"""Buffers that every chunk of one engine call reuses.

A chunk's temporaries are `[c, V]` float32 tensors of ~100 MiB (c = 544, V = 49,152). Allocated
afresh per chunk, each one costs more than the arithmetic done on it: on CPU glibc serves blocks
above its mmap threshold (at most 32 MiB) with a new mapping and returns them to the system when
freed, so every chunk page-faults its buffers in again (measured on this project's CPU: ~90 ms to
first-touch one 107 MB buffer, against ~35 ms for a softmax over it and ~600 ms for the logits GEMM
that fills it). A `Workspace` lives for one pass over the chunks and hands out the same storage to
each chunk by name, so the buffers are mapped once per call instead of once per chunk. On CUDA the
caching allocator already reuses blocks; the workspace costs nothing there either.

The contract: a buffer taken under a name is valid until the same name is taken again (the next
chunk); nothing that outlives a chunk may keep a view of one.
"""
from __future__ import annotations

import torch
from torch import Tensor


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
