"""The fused engine's chunk buffers (ops/workspace.py): allocated once per call, not once per chunk,
and the results do not depend on it (the gradient of every chunk is exact although all chunks share
the same storage)."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import qtarget
from objective_formulas import CATALOGUE_PARAMS
from qtarget.models.head import LMHead
from qtarget.ops import workspace as workspace_module
from qtarget.ops.sparse_teacher import topk_from_logits
from qtarget.ops.workspace import Workspace, advise_huge_pages, release_idle_workspaces, scratch

aten = torch.ops.aten
ALLOCATING = {aten.empty.memory_format, aten.empty_strided.default, aten.empty_like.default,
              aten.zeros_like.default, aten.full_like.default, aten.new_empty.default, aten.new_zeros.default}


class BigAllocations(TorchDispatchMode):
    """Counts tensors of at least `min_numel` elements created by any ATen op (outputs that did not
    exist before the op: fresh allocations, not views or out= writes)."""

    def __init__(self, min_numel: int):
        super().__init__()
        self.min_numel, self.count = min_numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {id(t.untyped_storage()) for t in _tensors((args, kwargs))}
        for t in _tensors(out):
            if t.numel() >= self.min_numel and id(t.untyped_storage()) not in inputs and t._base is None \
                    and "out" not in kwargs and not func._schema.is_mutable:
                self.count += 1
        return out


@pytest.fixture(autouse=True)
def no_kept_workspace():
    """Each test starts without a workspace kept by an earlier engine call."""
    release_idle_workspaces()
    yield
    release_idle_workspaces()


def _tensors(tree):
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, (list, tuple)):
        for item in tree:
            yield from _tensors(item)
    elif isinstance(tree, dict):
        for item in tree.values():
            yield from _tensors(item)


def problem(n=96, H=16, V=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, H, generator=g)
    W = torch.randn(V, H, generator=g) * (2.0 / math.sqrt(H))
    y = torch.randint(0, V, (n,), generator=g)
    y[::5] = -100
    th, tW = torch.randn(n, 12, generator=g), torch.randn(V, 12, generator=g) * 0.5
    return h, W, y, th, tW


@pytest.mark.parametrize("name", ["sft", "dft", "target_sft", "kd", "sft_kl", "distill_hybrid",
                                  "target_sft/topk-student", "kd/topk-renormalize", "target_sft/topk-uniform"])
def test_chunk_buffers_are_allocated_once_per_call(name):
    """Fresh [c, V]-sized tensors per fwd+bwd: the same count with 2 chunks as with 10 (the
    workspace's buffers, made by the first chunk), where one per chunk would add 8 or more. Also with
    a cached sparse teacher (top-k ids and log-probs made dense chunk by chunk), for each tail."""
    h, W, y, th, tW = problem()
    name, _, sparse = name.partition("/topk-")
    obj = qtarget.get_objective(name)
    kw = {}
    if sparse:
        kw = {"teacher_topk": topk_from_logits(th @ tW.T, k=16), "teacher_tail": sparse}
    elif "teacher" in obj.needs:
        kw = {"teacher_hidden": th, "teacher_head": LMHead(tW)}
    if "ref" in obj.needs:
        kw = {"ref_hidden": h + 0.1 * th[:, :1], "ref_head": LMHead(W.clone())}

    def count(chunk):
        hb, Wb = h.clone().requires_grad_(True), W.clone().requires_grad_(True)
        with BigAllocations(min_numel=8 * W.shape[0]) as mode:  # >= 8 rows of logits
            qtarget.fused_token_loss(obj, hb, Wb, y, chunk_size=chunk, **kw).loss.backward()
        return mode.count

    few, many = count(40), count(8)  # 2 chunks vs 10 (77 supervised rows)
    assert few == many, (few, many)


def test_engine_exact_with_shared_buffers_and_ragged_chunks():
    """Every chunk writes its gradient into the same storage: the result equals the full-logits
    reference for chunk sizes that leave a ragged last chunk (the buffers are sliced, not resized)."""
    h, W, y, th, tW = problem(n=61)
    obj = qtarget.get_objective("target_sft", eta=0.4)
    hr, Wr = h.clone().requires_grad_(True), W.clone().requires_grad_(True)
    ref = qtarget.token_loss(obj, hr @ Wr.T, y, teacher_logits=th @ tW.T)
    ref.loss.backward()
    for chunk in (7, 16, 61):
        hb, Wb = h.clone().requires_grad_(True), W.clone().requires_grad_(True)
        out = qtarget.fused_token_loss(obj, hb, Wb, y, teacher_hidden=th, teacher_head=LMHead(tW), chunk_size=chunk)
        out.loss.backward()
        assert float(out.loss.detach()) == pytest.approx(float(ref.loss.detach()), rel=1e-5)
        torch.testing.assert_close(hb.grad, hr.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(Wb.grad, Wr.grad, rtol=1e-4, atol=1e-6)
        assert out.metrics == pytest.approx(ref.metrics, rel=1e-4, abs=1e-6)


def test_workspace_hands_out_views_of_one_buffer():
    ws = Workspace("cpu")
    a = ws.take("x", 8, 5, torch.float32)
    b = ws.take("x", 3, 5, torch.float32)  # a smaller (ragged) chunk: the same storage
    assert b.data_ptr() == a.data_ptr() and b.shape == (3, 5) and b.is_contiguous()
    c = ws.take("x", 9, 5, torch.float32)  # larger: a new buffer
    assert c.shape == (9, 5)
    d = ws.take("x", 9, 5, torch.float64)  # another dtype: a new buffer
    assert d.dtype == torch.float64 and ws.nbytes == 9 * 5 * 8
    like = torch.zeros(4, 5)
    assert scratch(None, "y", like).shape == like.shape
    assert scratch(ws, "y", like).data_ptr() == ws.take("y", 4, 5, torch.float32).data_ptr()


def _thp_mode() -> str | None:
    path = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not sys.platform.startswith("linux") or not path.exists():
        return None
    return path.read_text().split("[")[1].split("]")[0]


def test_huge_page_advice():
    """On Linux with THP in "always" or "madvise" mode a large buffer takes the advice; tiny ones
    (no aligned 2 MiB page inside) and CUDA-less devices are left alone. Values are unaffected."""
    big = torch.empty(3 * 2**20)  # 12 MiB
    mode = _thp_mode()
    took = advise_huge_pages(big)
    if mode in ("always", "madvise"):
        assert took
    elif mode is None:
        assert not took
    big.fill_(1.5)
    assert float(big.sum()) == 1.5 * big.numel()
    assert not advise_huge_pages(torch.empty(10))


@pytest.mark.parametrize("name", list(CATALOGUE_PARAMS) + ["target_sft/topk-student", "kd/topk-uniform",
                                                            "distill_hybrid/topk-renormalize"])
def test_workspace_stays_within_the_memory_budget(name, monkeypatch):
    """The chunk's buffers (every [c, V] tensor the engine keeps in its workspace) fit the budget the
    chunk size was derived from (ops/budget.py's constants), for every catalogue objective with the
    auxiliary models it needs."""
    made: list[Workspace] = []

    class Recorded(Workspace):
        def __init__(self, device):
            super().__init__(device)
            made.append(self)

    monkeypatch.setattr(workspace_module, "Workspace", Recorded)
    h, W, y, th, tW = problem(n=200, V=500)
    name, _, sparse = name.partition("/topk-")
    obj = qtarget.get_objective(name, **CATALOGUE_PARAMS[name])
    kw = {}
    if sparse:  # a cached sparse teacher
        kw.update(teacher_topk=topk_from_logits(th @ tW.T, k=16), teacher_tail=sparse)
    elif "teacher" in obj.needs:
        kw.update(teacher_hidden=th, teacher_head=LMHead(tW))
    if "ref" in obj.needs:
        kw.update(ref_hidden=h + 0.1 * th[:, :1], ref_head=LMHead(W.clone()))
    if "old_logprobs" in obj.needs:
        kw["old_logprobs"] = -torch.rand(y.shape)
    if "token_weights" in obj.needs:
        kw["token_weights"] = torch.rand(y.shape)
    budget = 4 * 500 * 48 * 10  # 48 rows at k = 10, 80 at k = 6
    hb, Wb = h.clone().requires_grad_(True), W.clone().requires_grad_(True)
    qtarget.fused_token_loss(obj, hb, Wb, y, memory_budget=budget, **kw).loss.backward()
    assert made and max(ws.nbytes for ws in made) <= budget, (max(ws.nbytes for ws in made), budget)


def _sft_step(h, W, y, chunk):
    hb, Wb = h.clone().requires_grad_(True), W.clone().requires_grad_(True)
    out = qtarget.fused_token_loss("sft", hb, Wb, y, chunk_size=chunk)
    out.loss.backward()
    return out, hb.grad, Wb.grad


def test_cpu_workspace_is_kept_between_calls(monkeypatch):
    """A second call with the same shapes maps no new [c, V] buffer (a training step's engine call
    reuses the last step's pages), and gives the same result as the first."""
    monkeypatch.delenv(workspace_module.KEEP_ENV, raising=False)
    h, W, y, _, _ = problem()

    def fresh_buffers():
        with BigAllocations(min_numel=8 * W.shape[0]) as mode:
            result = _sft_step(h, W, y, 16)
        return mode.count, result

    first, (out1, gh1, gw1) = fresh_buffers()
    kept = len(workspace_module._idle[torch.device("cpu")]._buffers)  # z, p, the entropy's product
    second, (out2, gh2, gw2) = fresh_buffers()
    assert kept >= 2 and second == first - kept, (first, kept, second)  # the gradients: new each call
    assert torch.equal(out1.loss, out2.loss) and torch.equal(gh1, gh2) and torch.equal(gw1, gw2)
    assert out1.metrics == out2.metrics
    assert release_idle_workspaces() >= 2 * 16 * W.shape[0] * 4
    assert release_idle_workspaces() == 0


def test_kept_workspace_shrinks_to_the_call_and_can_be_turned_off(monkeypatch):
    """The kept buffers are those of the last call, at its chunk size: a call with smaller chunks or
    another objective leaves no larger or unused buffer behind; QTARGET_KEEP_WORKSPACE=0 keeps none."""
    monkeypatch.delenv(workspace_module.KEEP_ENV, raising=False)
    h, W, y, th, tW = problem()
    V = W.shape[0]
    hb = h.clone().requires_grad_(True)
    qtarget.fused_token_loss("target_sft", hb, W, y, teacher_hidden=th, teacher_head=LMHead(tW),
                             chunk_size=32).loss.backward()
    big = release_idle_workspaces()
    assert big >= 4 * 32 * V * 4  # z, p, the teacher's logits, the mixture
    qtarget.fused_token_loss("target_sft", hb, W, y, teacher_hidden=th, teacher_head=LMHead(tW),
                             chunk_size=32).loss.backward()
    _sft_step(h, W, y, 8)  # smaller chunks, no teacher
    kept = workspace_module._idle[torch.device("cpu")]
    assert all(b.shape[0] <= 8 for b in kept._buffers.values()), {k: b.shape for k, b in kept._buffers.items()}
    assert not any(k.startswith("teacher") or k == "mix" for k in kept._buffers), list(kept._buffers)
    monkeypatch.setenv(workspace_module.KEEP_ENV, "0")
    release_idle_workspaces()
    _sft_step(h, W, y, 8)
    assert release_idle_workspaces() == 0


def test_kept_buffers_grow_by_doubling_within_the_chunk():
    """Row counts that vary from call to call (batches of different lengths) settle: an outgrown
    buffer at least doubles, but never beyond the call's chunk size."""
    ws = workspace_module.acquire("cpu", rows=100, cols=7)
    assert ws.take("z", 10, 7, torch.float32).shape == (10, 7)
    workspace_module.release(ws)
    ws = workspace_module.acquire("cpu", rows=100, cols=7)
    assert ws.take("z", 12, 7, torch.float32).shape == (12, 7)
    assert ws._buffers["z"].shape[0] == 20  # doubled
    workspace_module.release(ws)
    ws = workspace_module.acquire("cpu", rows=30, cols=7)  # the chunk size caps the growth
    assert ws.take("z", 25, 7, torch.float32).shape == (25, 7) and ws._buffers["z"].shape[0] == 30
    workspace_module.release(ws)
    nested = workspace_module.acquire("cpu", rows=30, cols=7)
    inner = workspace_module.acquire("cpu", rows=30, cols=7)  # another call while one holds it: its own
    assert inner is not nested
