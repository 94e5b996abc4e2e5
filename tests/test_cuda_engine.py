"""The fused engine on a CUDA device (skipped without one): float32 exactness against the full-logits
reference, bf16 within the bounds of tests/test_mixed_precision.py (the float32-output GEMM for the
head's gradient), the Triton-compiled sft/dft kernel against the closed form without a recompile per
chunk size, no host synchronisation per chunk (torch.cuda.set_sync_debug_mode), and the memory of a
large-vocabulary call. Figures (time, peak memory against TRL and Liger) come from
benchmarks/cuda_engine.py, not from here."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

import qtarget
from objective_formulas import CATALOGUE_PARAMS
from qtarget.models.head import LMHead
from qtarget.ops import kernels
from test_mixed_precision import check_bf16_sft_bounds

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEV = "cuda"


def problem(n=300, H=64, V=5000, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, H, generator=g)
    W = torch.randn(V, H, generator=g) * (3.0 / math.sqrt(H))
    y = torch.randint(0, V, (n,), generator=g)
    y[::9] = -100
    t_h, t_W = torch.randn(n, 32, generator=g), torch.randn(V, 32, generator=g) * 0.5
    return [t.to(DEV) for t in (h.to(dtype), W.to(dtype), y, t_h.to(dtype), t_W.to(dtype))]


@pytest.fixture(autouse=True)
def no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.parametrize("name", ["sft", "dft", "psft", "target_sft", "asft", "gem"])
@pytest.mark.parametrize("compile_flag", ["0", "auto"])
def test_float32_matches_full_logits(name, compile_flag, monkeypatch):
    monkeypatch.setenv(kernels.COMPILE_ENV, compile_flag)
    obj = qtarget.get_objective(name, **CATALOGUE_PARAMS[name])
    h, W, y, t_h, t_W = problem()
    kw, ref_kw = {}, {}
    if "teacher" in obj.needs:
        kw = dict(teacher_hidden=t_h, teacher_head=LMHead(t_W))
        ref_kw["teacher_logits"] = t_h @ t_W.T
    if "ref" in obj.needs:
        kw = dict(ref_hidden=h + 0.1, ref_head=LMHead(W))
        ref_kw["ref_logits"] = (h + 0.1) @ W.T
    if "old_logprobs" in obj.needs:
        kw["old_logprobs"] = ref_kw["old_logprobs"] = torch.full(y.shape, -8.0, device=DEV)
    a = [t.clone().requires_grad_(True) for t in (h, W)]
    got = qtarget.fused_token_loss(obj, *a, y, chunk_size=64, **kw)
    got.loss.backward()
    b = [t.clone().requires_grad_(True) for t in (h, W)]
    want = qtarget.token_loss(obj, b[0] @ b[1].T, y, **ref_kw)
    want.loss.backward()
    assert float(got.loss.detach()) == pytest.approx(float(want.loss.detach()), rel=1e-5, abs=1e-6)
    for x, r in zip(a, b):
        assert float((x.grad - r.grad).abs().max() / r.grad.abs().max()) <= 1e-5
    for key, value in want.metrics.items():
        assert got.metrics[key] == pytest.approx(value, rel=1e-4, abs=1e-4), key


@pytest.mark.parametrize("chunk_size", [4, 48])
def test_bf16_within_derived_bounds(chunk_size):
    check_bf16_sft_bounds(chunk_size, device=DEV)


def test_compiled_kernel_one_graph_for_all_chunk_sizes(monkeypatch):
    dynamo = pytest.importorskip("torch._dynamo")
    monkeypatch.setenv(kernels.COMPILE_ENV, "1")
    dynamo.reset()
    kernels._compiled.clear()
    dynamo.utils.counters.clear()
    h, W, y, *_ = problem(n=400)
    for chunk in (128, 100, 37, 64):
        for name in ("sft", "dft"):
            got = qtarget.fused_token_loss(name, h, W, y, chunk_size=chunk)
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv(kernels.COMPILE_ENV, "0")
                want = qtarget.fused_token_loss(name, h, W, y, chunk_size=chunk)
            assert float(got.loss) == pytest.approx(float(want.loss), rel=1e-5)
    assert not kernels._compile_broken, kernels._compile_broken
    assert 1 <= dynamo.utils.counters["stats"]["unique_graphs"] <= 2


def test_no_host_sync_per_chunk():
    """torch.cuda's sync debug mode warns at every synchronising call: the number of warnings of one
    fwd+bwd is the same with 3 chunks and with 25."""
    h, W, y, t_h, t_W = problem(n=400)

    def count(chunk):
        hb, Wb = h.clone().requires_grad_(True), W.clone().requires_grad_(True)
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                out = qtarget.fused_token_loss("target_sft", hb, Wb, y, chunk_size=chunk, teacher_hidden=t_h,
                                               teacher_head=LMHead(t_W))
                out.loss.backward()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    assert count(150) == count(16)


def test_large_vocabulary_memory_is_flat_in_tokens():
    """bf16, V = 151,936, H = 896: the engine's peak above its inputs grows by the hidden gradient
    only (N x H), not by N x V, from 4k to 16k tokens."""
    V, H = 151936, 896
    W = (torch.randn(V, H, device=DEV) * 0.03).to(torch.bfloat16).requires_grad_(True)
    peaks = {}
    for N in (4096, 16384):
        h = torch.randn(N, H, device=DEV, dtype=torch.bfloat16, requires_grad=True)
        y = torch.randint(0, V, (N,), device=DEV)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        qtarget.fused_token_loss("sft", h, W, y).loss.backward()
        torch.cuda.synchronize()
        peaks[N] = torch.cuda.max_memory_allocated() - base
        W.grad = None
        del h, y
    grown = peaks[16384] - peaks[4096]
    assert grown <= 2 * (16384 - 4096) * H * 2 + 64 * 2**20, peaks  # hidden + its gradient, + slack
