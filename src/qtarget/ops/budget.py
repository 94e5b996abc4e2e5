"""How many token rows one chunk of the fused engine holds, from a memory budget.

A chunk of `c` supervised rows keeps a handful of `[c, V]` float32 buffers alive at once (the call's
workspace, ops/workspace.py): the logits (into which the gradient is written back), the softmax p, a
scratch buffer for row-wise dot products, and the objective's own (the residual pi, the teacher's or
reference model's logits, their softmax q, a shifted or tempered copy). The engine sizes chunks so
that those buffers fit in the budget:

    rows = budget_bytes // (4 * V * k)          k = TEMPORARIES_STUDENT (+ TEMPORARIES_PER_AUX per
                                                teacher / reference model given)

rounded down to a multiple of 8 (at least 8). The constants were measured with
`benchmarks/loss_engine.py --calibrate` (peak RSS above the inputs and gradients divided by
4 * V * rows, V = 49,152, 256 rows, CPU) and rounded up: student-only objectives k = 3.6 (sft, dft,
psft), 4.6 (eaft), 5.6 (gem); with one teacher or reference model 5.6 (kd), 6.6 (target_sft, asft,
sft_kl, distill_hybrid), i.e. +3.0 per auxiliary model. The rounding leaves room for allocators that,
unlike the CPU one, keep freed blocks resident (CUDA caching allocator).

The budget defaults to 1 GiB. Smaller chunks cost time: the head's gradient is accumulated once per
chunk (a [V, H] read-modify-write whose GEMM has inner dimension c), so with V = 151,936 a 256 MiB
budget (72 rows) ran fwd+bwd of sft at N = 2048 in 37.1 s and 1 GiB (288 rows) in 29.0 s on the CPU
of this project (same process, alternating). Set it per call (`memory_budget=` bytes) or process-wide with the
environment variable QTARGET_FUSED_BUDGET_MB. An explicit `chunk_size=` wins over both.
"""
from __future__ import annotations

import os

DEFAULT_BUDGET_BYTES = 2**30
BUDGET_ENV = "QTARGET_FUSED_BUDGET_MB"
# [c, V] float32 buffers alive at the peak of one chunk (forward + logit gradient + metrics).
TEMPORARIES_STUDENT = 6
TEMPORARIES_PER_AUX = 3
ROW_MULTIPLE = 8


def budget_bytes(memory_budget: int | None = None) -> int:
    """The budget in bytes: the argument, else $QTARGET_FUSED_BUDGET_MB, else 1 GiB."""
    if memory_budget is not None:
        if int(memory_budget) <= 0:
            raise ValueError(f"memory_budget must be a positive number of bytes, got {memory_budget}")
        return int(memory_budget)
    env = os.environ.get(BUDGET_ENV)
    if env:
        try:
            mb = float(env)
        except ValueError:
            raise ValueError(f"environment variable {BUDGET_ENV} must be a number of MiB, got {env!r}") from None
        if mb <= 0:
            raise ValueError(f"environment variable {BUDGET_ENV} must be > 0 MiB, got {env!r}")
        return int(mb * 2**20)
    return DEFAULT_BUDGET_BYTES


def chunk_rows(vocab_size: int, n_aux_models: int = 0, memory_budget: int | None = None) -> int:
    """Rows per chunk for vocabulary `vocab_size` with `n_aux_models` teacher/reference distributions."""
    k = TEMPORARIES_STUDENT + TEMPORARIES_PER_AUX * n_aux_models
    rows = budget_bytes(memory_budget) // (4 * max(int(vocab_size), 1) * k)
    return max(ROW_MULTIPLE, rows // ROW_MULTIPLE * ROW_MULTIPLE)


def resolve_chunk_size(chunk_size: int | None, vocab_size: int, n_aux_models: int,
                       memory_budget: int | None = None) -> int:
    if chunk_size is None:
        return chunk_rows(vocab_size, n_aux_models, memory_budget)
    if isinstance(chunk_size, bool) or int(chunk_size) != chunk_size or int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be a positive integer number of rows, got {chunk_size!r}")
    return int(chunk_size)
