"""The chunk kernels of the fused engine (ops/kernels.py): the closed-form gradient and the compiled
sft/dft kernel against the autograd kernel (the objective's own `terms` + autograd), chunk by chunk,
for every objective of the catalogue, several shapes and dtypes; and which kernel is chosen when."""
from __future__ import annotations

import logging
import math

import pytest
import torch

import qtarget
from objective_formulas import CATALOGUE_PARAMS
from qtarget.objectives.base import Objective, TokenTerms
from qtarget.objectives.catalog import SFT
from qtarget.ops import analytic, kernels
from qtarget.ops.analytic import chunk_stats, closed_form_of
from qtarget.ops.kernels import autograd_step, closed_form_step, select_kernel

SHAPES = [(7, 50), (33, 1000)]


def chunk_inputs(c, V, dtype, seed, sharp=False):
    """z [c, V] (optionally very peaked rows), labels (half argmax, half random) and every auxiliary
    input; the teacher has -inf logits on its padded rows."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(c, V, generator=g, dtype=torch.float64) * (30.0 if sharp else 2.5)
    y = torch.where(torch.rand(c, generator=g) < 0.5, z.argmax(-1), torch.randint(0, V, (c,), generator=g))
    teacher = torch.randn(c, V, generator=g, dtype=torch.float64) * 2.0
    teacher[:, -3:] = -math.inf
    ref = z + 0.5 * torch.randn(c, V, generator=g, dtype=torch.float64)
    logp_y = torch.log_softmax(z, -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
    aux = {"labels": y, "teacher_logits": teacher.to(dtype), "ref_logits": ref.to(dtype),
           "old_logprobs": (logp_y + 0.4 * torch.randn(c, generator=g, dtype=torch.float64)).float(),
           "token_weights": torch.rand(c, generator=g)}
    weights = torch.rand(c, generator=g) / c
    return z.to(dtype), aux, weights


def aux_for(obj, aux):
    keep = {"labels"} | {{"teacher": "teacher_logits", "ref": "ref_logits"}.get(n, n) for n in obj.needs}
    return {k: (v if k in keep else None) for k, v in aux.items()}


def both(obj, z, aux, weights, kernel=closed_form_step, metrics=True):
    a = aux_for(obj, aux)
    got = kernel(obj, z.clone(), a, weights, want_grad=True, metrics=metrics)
    want = autograd_step(obj, z.clone(), a, weights, want_grad=True, metrics=metrics)
    return got, want


def assert_close(got, want, tol, what):
    assert got.shape == want.shape and got.dtype == want.dtype, what
    scale = want.abs().max().clamp_min(1e-30)
    err = float((got.double() - want.double()).abs().max() / scale)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"c{s[0]}V{s[1]}")
@pytest.mark.parametrize("name", list(CATALOGUE_PARAMS))
def test_closed_form_equals_autograd(name, shape, dtype):
    obj = qtarget.get_objective(name, **CATALOGUE_PARAMS[name])
    assert closed_form_of(obj) is not None
    z, aux, weights = chunk_inputs(*shape, dtype, seed=len(name) + shape[0])
    got, want = both(obj, z, aux, weights)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    assert_close(got.loss, want.loss, tol, "loss")
    assert_close(got.grad, want.grad, tol, "grad")
    assert float(got.weighted) == pytest.approx(float(want.weighted), rel=tol, abs=tol)
    assert set(got.metrics) == set(want.metrics)
    for key, value in want.metrics.items():
        assert_close(got.metrics[key], value, 10 * tol, key)


@pytest.mark.parametrize("name", list(CATALOGUE_PARAMS))
def test_closed_form_in_row_blocks_equals_autograd(name, monkeypatch):
    """The vocabulary sums (entropy, cross-entropies, the KL metrics formed without the teacher's
    softmax) go through small row blocks on CPU; 5-row blocks over 33 rows (a ragged last block) give
    the autograd kernel's loss, gradient and metrics."""
    monkeypatch.setattr(analytic, "BLOCK_BYTES", 5 * 1000 * 8)
    obj = qtarget.get_objective(name, **CATALOGUE_PARAMS[name])
    z, aux, weights = chunk_inputs(33, 1000, torch.float64, seed=len(name))
    assert analytic.block_rows(z) == 5
    got, want = both(obj, z, aux, weights)
    assert_close(got.loss, want.loss, 1e-12, "loss")
    assert_close(got.grad, want.grad, 1e-12, "grad")
    for key, value in want.metrics.items():
        assert_close(got.metrics[key], value, 1e-11, key)


def rel_err(got, truth):
    return float((got.double() - truth).abs().max() / truth.abs().max().clamp_min(1e-300))


@pytest.mark.parametrize("name", list(CATALOGUE_PARAMS))
def test_closed_form_as_accurate_as_autograd_on_peaked_rows(name):
    """Logits of scale 30 (|z| up to ~100; some p_y underflow float32): the float32 closed form is
    as close to the float64 truth as the float32 autograd reference is (losses that are small
    differences of vocabulary sums, e.g. target_sft and gem, included)."""
    obj = qtarget.get_objective(name, **CATALOGUE_PARAMS[name])
    z, aux, weights = chunk_inputs(40, 300, torch.float32, seed=5, sharp=True)
    logp_y = torch.log_softmax(z.double(), -1).gather(-1, aux["labels"].unsqueeze(-1))
    assert logp_y.min() < -104  # exp underflows to 0 in float32 for those labels
    got, want = both(obj, z, aux, weights, metrics=False)
    assert got.metrics is None and want.metrics is None
    a64 = {k: (v.double() if v is not None and v.is_floating_point() else v) for k, v in aux_for(obj, aux).items()}
    truth = autograd_step(obj, z.double(), a64, weights.double(), want_grad=True, metrics=False)
    for what in ("loss", "grad"):
        ours, ref = rel_err(getattr(got, what), getattr(truth, what)), rel_err(getattr(want, what), getattr(truth, what))
        assert ours <= max(3 * ref, 1e-6), f"{what}: closed form {ours:.2g}, autograd {ref:.2g}"


def test_chunk_stats_against_float64_formulas():
    z, aux, _ = chunk_inputs(20, 500, torch.float32, seed=2)
    s = chunk_stats(z, aux["labels"])
    logp = torch.log_softmax(z.double(), -1)
    assert_close(s.lse, torch.logsumexp(z.double(), -1).float(), 1e-6, "lse")
    assert_close(s.logp_y, logp.gather(-1, aux["labels"].unsqueeze(-1)).squeeze(-1).float(), 1e-6, "logp_y")
    assert_close(s.entropy, (-(logp.exp() * logp).sum(-1)).float(), 1e-5, "entropy")
    assert_close(s.p, logp.exp().float(), 1e-6, "p")
    assert torch.equal(s.top1.bool(), logp.argmax(-1) == aux["labels"])


class Squared(Objective):
    """A user objective (no closed form): (1 - p_y)^2."""

    name = "squared_user"

    def terms(self, x):
        return TokenTerms(loss=(1.0 - x.logp_y.exp()) ** 2, gamma=x.p_y_detached)


class SFTOverridden(SFT):
    """A subclass that changes `terms`: the parent's closed form must not be used."""

    def terms(self, x):
        return TokenTerms(loss=-2.0 * x.logp_y, gamma=torch.ones_like(x.p_y_detached))


def test_kernel_choice(monkeypatch, caplog):
    monkeypatch.delenv(kernels.COMPILE_ENV, raising=False)
    monkeypatch.delenv(kernels.CLOSED_FORM_ENV, raising=False)
    monkeypatch.setattr(kernels, "_logged", set())
    sft = qtarget.get_objective("sft")
    with caplog.at_level(logging.INFO, logger="qtarget.ops"):
        assert select_kernel(sft, "cpu")[0] == "closed_form"
        assert select_kernel(sft, "cpu")[0] == "closed_form"
    assert sum("closed_form kernel for sft" in r.getMessage() for r in caplog.records) == 1  # logged once
    assert select_kernel(sft, "cuda")[0] == "compiled"
    assert select_kernel(qtarget.get_objective("target_sft"), "cuda")[0] == "compiled"
    assert select_kernel(qtarget.get_objective("target_sft", eta=0.0), "cuda")[0] == "closed_form"
    assert select_kernel(qtarget.get_objective("kd"), "cuda")[0] == "closed_form"
    assert select_kernel(Squared(), "cpu")[0] == "autograd"
    assert select_kernel(SFTOverridden(), "cpu")[0] == "autograd"
    monkeypatch.setenv(kernels.COMPILE_ENV, "0")
    assert select_kernel(sft, "cuda")[0] == "closed_form"
    monkeypatch.setenv(kernels.COMPILE_ENV, "1")
    assert select_kernel(sft, "cpu")[0] == "compiled"
    monkeypatch.setenv(kernels.CLOSED_FORM_ENV, "0")
    assert select_kernel(sft, "cpu")[0] == "autograd"
    monkeypatch.setenv(kernels.COMPILE_ENV, "sometimes")
    monkeypatch.delenv(kernels.CLOSED_FORM_ENV)
    with pytest.raises(ValueError, match="QTARGET_COMPILE must be 0, 1 or auto"):
        select_kernel(sft, "cpu")


def test_overridden_terms_are_exact_through_the_engine():
    """The engine with a subclass overriding `terms` follows the override (autograd kernel)."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(30, 8, generator=g, requires_grad=True)
    W = torch.randn(40, 8, generator=g, requires_grad=True)
    y = torch.randint(0, 40, (30,), generator=g)
    got = qtarget.fused_token_loss(SFTOverridden(), h, W, y, chunk_size=7)
    want = qtarget.fused_token_loss("sft", h, W, y, chunk_size=7)
    assert float(got.loss.detach()) == pytest.approx(2 * float(want.loss.detach()), rel=1e-6)


def test_engine_kernels_agree_end_to_end(monkeypatch):
    """fused_token_loss with the closed form and with QTARGET_CLOSED_FORM=0: same loss, gradients
    and metrics (bias, logit scale and softcap on; teacher through its own head)."""
    g = torch.Generator().manual_seed(1)
    h0 = torch.randn(3, 11, 16, generator=g)
    W0 = torch.randn(300, 16, generator=g) * 0.5
    b0 = torch.randn(300, generator=g) * 0.1
    y = torch.randint(0, 300, (3, 11), generator=g)
    y[0, :3] = -100
    th, tW = torch.randn(3, 11, 12, generator=g), torch.randn(300, 12, generator=g) * 0.5
    results = []
    for flag in ("1", "0"):
        monkeypatch.setenv(kernels.CLOSED_FORM_ENV, flag)
        h, W, b = (t.clone().requires_grad_(True) for t in (h0, W0, b0))
        out = qtarget.fused_token_loss(qtarget.get_objective("target_sft", eta=0.4), h, W, y, lm_head_bias=b,
                                       logit_scale=0.7, softcap=5.0, teacher_hidden=th, teacher_head=tW,
                                       chunk_size=8)
        out.loss.backward()
        results.append((out, h.grad, W.grad, b.grad))
    (a, *ga), (b_, *gb) = results
    assert float(a.loss.detach()) == pytest.approx(float(b_.loss.detach()), rel=1e-6)
    for x1, x2, what in zip(ga, gb, ("hidden", "weight", "bias")):
        assert_close(x1, x2, 1e-5, what)
    assert a.metrics == pytest.approx(b_.metrics, rel=1e-4, abs=1e-5)


# ------------------------------------------------------------------------------- compiled kernel
@pytest.mark.slow
def test_compiled_kernel_is_exact_and_compiles_once_for_all_chunk_sizes(monkeypatch):
    """QTARGET_COMPILE=1 on CPU (Inductor C++): sft, dft and target_sft (teacher logits with -inf
    entries) equal the closed form; chunk sizes 24, 13, 5 (ragged) and 40 reuse the graph compiled
    for the first size (dynamic rows)."""
    dynamo = pytest.importorskip("torch._dynamo")
    dynamo.reset()
    kernels._compiled.clear()
    dynamo.utils.counters.clear()
    for name in ("sft", "dft", "target_sft"):
        obj = qtarget.get_objective(name, **CATALOGUE_PARAMS[name])
        for c in (24, 13, 5, 40):
            z, aux, weights = chunk_inputs(c, 257, torch.float32, seed=c)
            got, want = both(obj, z, aux, weights, kernel=kernels.compiled_step)
            if kernels._compile_broken:
                pytest.skip(f"torch.compile does not work here: {kernels._compile_broken[0]}")
            assert_close(got.loss, want.loss, 2e-5, f"{name} c={c} loss")
            assert_close(got.grad, want.grad, 2e-5, f"{name} c={c} grad")
            for key, value in want.metrics.items():
                assert_close(got.metrics[key], value, 2e-4, f"{name} c={c} {key}")
    # one graph per kernel and dft flag (sft, dft, target_sft), none per chunk size
    assert 1 <= dynamo.utils.counters["stats"]["unique_graphs"] <= 3
    assert sum(dynamo.utils.counters["recompiles"].values()) <= 1  # dft's flag in the sft graph
