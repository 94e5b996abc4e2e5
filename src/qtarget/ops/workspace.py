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

On CPU the workspace also outlives the call: `acquire` hands the last call's workspace to the next
one (a training step calls the engine with the same shapes every step), so its pages are mapped once
per run instead of once per step. Mapping them is not only the first-touch cost above: right after many
ordinary pages were freed (the last step's activations, by its backward), the kernel may have to
compact memory to find huge pages for the advised buffers (direct compaction under THP's default `defrag=madvise`), which measured
~1 s of system time per call at N = 4,096, V = 49,152 on this project's machine. The held buffers are
exactly the ones the last call used, at its chunk size (a call with smaller chunks or another
vocabulary drops the rest first). They are in use at the end of the forward, where a step's
activations peak; kept, they stay resident through the backward and the optimizer step too, which can
raise a step whose peak falls there by up to one workspace. `release_idle_workspaces()` frees them;
`QTARGET_KEEP_WORKSPACE=0` turns the keeping off. On CUDA the caching allocator already reuses
blocks, and nothing is kept.

The contract: a buffer taken under a name is valid until the same name is taken again (the next
chunk); nothing that outlives a chunk may keep a view of one, and nothing that outlives the call may
keep a view of any.
"""
from __future__ import annotations

import ctypes
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

KEEP_ENV = "QTARGET_KEEP_WORKSPACE"
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
        self._taken: set[str] = set()  # names taken since the last `fit`
        self._max_rows: int | None = None  # the current call's chunk size, from `fit`

    def fit(self, rows: int, cols: int) -> None:
        """Start a new call of at most `rows` rows per chunk and `cols` columns: drop the buffers it
        could not use as they are (more rows than its chunks, another width)."""
        self._buffers = {k: b for k, b in self._buffers.items() if b.shape[0] <= rows and b.shape[1] == cols}
        self._taken.clear()
        self._max_rows = rows

    def drop_untaken(self) -> None:
        """Free the buffers the current call never took (an earlier objective's)."""
        self._buffers = {k: b for k, b in self._buffers.items() if k in self._taken}

    def take(self, name: str, rows: int, cols: int, dtype: torch.dtype) -> Tensor:
        self._taken.add(name)
        buf = self._buffers.get(name)
        if buf is None or buf.shape[0] < rows or buf.shape[1] != cols or buf.dtype != dtype:
            alloc = rows
            if buf is not None and buf.shape[1] == cols and buf.dtype == dtype and self._max_rows is not None:
                # a kept buffer outgrown by a call with more rows (batches vary in length): at least double
                # it, within the chunk size, so a run's growing row counts settle after a few steps
                alloc = max(rows, min(self._max_rows, 2 * buf.shape[0]))
            buf = torch.empty((alloc, cols), dtype=dtype, device=self.device)
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


_idle: dict[torch.device, Workspace] = {}
_idle_lock = threading.Lock()


def keeps_workspace(device: torch.device) -> bool:
    return device.type == "cpu" and os.environ.get(KEEP_ENV, "1").strip() != "0"


@contextmanager
def workspace_for_call(device: torch.device | str, rows: int, cols: int) -> Iterator[Workspace]:
    """`acquire` ... `release` around one engine call."""
    ws = acquire(device, rows, cols)
    try:
        yield ws
    finally:
        release(ws)


def acquire(device: torch.device | str, rows: int, cols: int) -> Workspace:
    """The workspace for one engine call on `device` with chunks of at most `rows` rows of `cols`
    columns: the last call's (fitted to these shapes) when it is idle, else a new one. A call that
    runs while another holds the kept workspace (nested or in another thread) gets a new one."""
    device = torch.device(device)
    with _idle_lock:
        ws = _idle.pop(device, None)
    if ws is None:
        ws = Workspace(device)
    ws.fit(rows, cols)
    return ws


def release(ws: Workspace) -> None:
    """End of the call that acquired `ws`: keep it for the next call (CPU), or let it go."""
    if not keeps_workspace(ws.device):
        return
    ws.drop_untaken()
    with _idle_lock:
        _idle[ws.device] = ws


def kept_workspace_bytes() -> int:
    """Bytes held by the workspaces kept between engine calls."""
    with _idle_lock:
        return sum(ws.nbytes for ws in _idle.values())


def release_idle_workspaces() -> int:
    """Free the workspaces kept between engine calls; returns the bytes freed."""
    with _idle_lock:
        kept = list(_idle.values())
        _idle.clear()
    return sum(ws.nbytes for ws in kept)


def scratch(workspace: Workspace | None, name: str, like: Tensor) -> Tensor:
    """An uninitialised [rows, cols] tensor like `like`: the workspace's buffer `name` when there is
    a workspace, else a fresh one (kernels called on their own, e.g. in tests)."""
    if workspace is None:
        return torch.empty(like.shape, dtype=like.dtype, device=like.device)
    return workspace.like(name, like)
