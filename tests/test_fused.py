"""The fused chunked engine equals the reference path (`token_loss` on full logits): loss, per-token
loss, metrics and gradients w.r.t. hidden, weight and bias, for every objective of the catalogue."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import qtarget
from objective_formulas import CATALOGUE_PARAMS
from qtarget import fused_token_loss, token_loss
from qtarget.models.head import LMHead
from qtarget.ops import chunked as chunked_mod
from qtarget.ops.budget import BUDGET_ENV, DEFAULT_BUDGET_BYTES, TEMPORARIES_PER_AUX, TEMPORARIES_STUDENT, chunk_rows

H, V = 24, 1000


def make_inputs(lead, seed=0, hidden_size=H, vocab=V, dtype=torch.float32, teacher_hidden_size=16):
    """Random hidden [*lead, H], head [V, H], bias [V], labels (argmax / random / ignored) and every
    auxiliary input, with teacher and reference models given as hidden states + heads."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*lead, hidden_size, generator=g)
    W = torch.randn(vocab, hidden_size, generator=g) * (3.0 / math.sqrt(hidden_size))
    b = torch.randn(vocab, generator=g) * 0.5
    z = h @ W.T
    y = torch.randint(0, vocab, tuple(lead), generator=g)
    y = torch.where(torch.rand(tuple(lead), generator=g) < 0.4, z.argmax(-1), y)
    y = torch.where(torch.rand(tuple(lead), generator=g) < 0.2, torch.full_like(y, -100), y)
    logp_y = torch.log_softmax(z, -1).gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    th = torch.randn(*lead, teacher_hidden_size, generator=g)
    tW = torch.randn(vocab, teacher_hidden_size, generator=g) * (3.0 / math.sqrt(teacher_hidden_size))
    rh = h + 0.3 * torch.randn(h.shape, generator=g)
    rW = W + 0.1 * torch.randn(W.shape, generator=g)
    return {
        "hidden": h.to(dtype), "weight": W.to(dtype), "bias": b.to(dtype), "labels": y,
        "teacher_hidden": th.to(dtype), "teacher_head": tW.to(dtype),
        "ref_hidden": rh.to(dtype), "ref_head": rW.to(dtype),
        "old_logprobs": logp_y + 0.5 * torch.randn(logp_y.shape, generator=g),
        "token_weights": torch.rand(tuple(lead), generator=g),
    }


def leaves(c, bias=True):
    h = c["hidden"].clone().requires_grad_(True)
    W = c["weight"].clone().requires_grad_(True)
    b = c["bias"].clone().requires_grad_(True) if bias else None
    return h, W, b


def full_logits(h, W, b, scale=1.0, softcap=None):
    z = F.linear(h, W, b) * scale
    return z if softcap is None else softcap * torch.tanh(z / softcap)


def aux_kwargs(obj, c, as_logits: bool, scale=1.0, softcap=None):
    """Teacher / reference inputs, each through its own head (here with the same scale and softcap as
    the student's): as full logits, or as hidden states + an LMHead."""
    out = {}
    if "teacher" in obj.needs:
        if as_logits:
            out["teacher_logits"] = full_logits(c["teacher_hidden"], c["teacher_head"], None, scale, softcap)
        else:
            out.update(teacher_hidden=c["teacher_hidden"],
                       teacher_head=LMHead(c["teacher_head"], logit_scale=scale, softcap=softcap))
    if "ref" in obj.needs:
        if as_logits:
            out["ref_logits"] = full_logits(c["ref_hidden"], c["ref_head"], None, scale, softcap)
        else:
            out.update(ref_hidden=c["ref_hidden"], ref_head=LMHead(c["ref_head"], logit_scale=scale, softcap=softcap))
    for key in ("old_logprobs", "token_weights"):
        if {"old_logprobs": "old_logprobs", "token_weights": "token_weights"}[key] in obj.needs:
            out[key] = c[key]
    return out


def run_both(obj, c, *, bias=True, scale=1.0, softcap=None, aux_as_logits=False, reduction="mean",
             normalizer=None, **fused_kw):
    """(fused result, fused grads, reference result, reference grads) for the same problem."""
    h, W, b = leaves(c, bias)
    got = fused_token_loss(obj, h, W, c["labels"], lm_head_bias=b, logit_scale=scale, softcap=softcap,
                           reduction=reduction, normalizer=normalizer,
                           **aux_kwargs(obj, c, aux_as_logits, scale, softcap),
                           **fused_kw)
    params = [t for t in (h, W, b) if t is not None]
    got_grads = torch.autograd.grad(got.loss, params)
    h2, W2, b2 = leaves(c, bias)
    want = token_loss(obj, full_logits(h2, W2, b2, scale, softcap), c["labels"], reduction=reduction,
                      normalizer=normalizer, **aux_kwargs(obj, c, True, scale, softcap))
    want_grads = torch.autograd.grad(want.loss, [t for t in (h2, W2, b2) if t is not None])
    return got, got_grads, want, want_grads


def assert_rel(got, want, tol, what=""):
    """max |got - want| <= tol * max |want| (relative error in the max norm)."""
    assert got.shape == want.shape, what
    scale = want.abs().max().clamp_min(1e-30)
    err = float(((got.double() - want.double()).abs().max()) / scale)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol}"


def assert_same(got, got_grads, want, want_grads, tol=1e-5, metric_tol=1e-4):
    assert got.loss.dtype == want.loss.dtype
    a, b = float(got.loss.detach()), float(want.loss.detach())
    assert abs(a - b) <= tol * max(abs(b), 1e-6), (a, b)
    assert got.per_token.shape == want.per_token.shape and got.per_token.dtype == torch.float32
    assert not got.per_token.requires_grad
    assert_rel(got.per_token, want.per_token.detach(), tol, "per_token")
    for i, (a, b) in enumerate(zip(got_grads, want_grads)):
        assert a.dtype == b.dtype
        assert_rel(a, b, tol, f"grad {['hidden', 'weight', 'bias'][i]}")
    assert set(got.metrics) == set(want.metrics)
    for key, value in want.metrics.items():
        assert got.metrics[key] == pytest.approx(value, rel=metric_tol, abs=metric_tol), key


OPTIONS = {
    "plain": dict(bias=False),
    "bias_scale_softcap": dict(bias=True, scale=0.8, softcap=6.0),
}


@pytest.mark.parametrize("name", list(CATALOGUE_PARAMS))
@pytest.mark.parametrize("lead", [(53,), (3, 17)], ids=["N", "BT"])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_every_objective_matches_reference(name, lead, option):
    obj = qtarget.get_objective(name, **CATALOGUE_PARAMS[name])
    c = make_inputs(lead, seed=len(name) + len(lead))
    # chunk_size 8 forces several chunks and a ragged last one
    assert_same(*run_both(obj, c, chunk_size=8, **OPTIONS[option]))


@pytest.mark.parametrize("mode", ["forward", "recompute"])
@pytest.mark.parametrize("name", ["sft", "dft", "psft", "asft", "target_sft", "gem", "eaft"])
@pytest.mark.parametrize("chunk_size", [1, 13, None])
def test_modes_and_chunk_sizes_agree(name, mode, chunk_size):
    obj = qtarget.get_objective(name, **CATALOGUE_PARAMS[name])
    c = make_inputs((2, 21), seed=3)
    assert_same(*run_both(obj, c, bias=True, softcap=4.0, mode=mode, chunk_size=chunk_size))


@pytest.mark.parametrize("name", ["kd", "distill_hybrid", "target_sft", "sft_kl", "asft"])
def test_precomputed_teacher_and_reference_logits(name):
    obj = qtarget.get_objective(name, **CATALOGUE_PARAMS[name])
    c = make_inputs((4, 9), seed=5)
    assert_same(*run_both(obj, c, aux_as_logits=True, chunk_size=6, scale=1.3))


@pytest.mark.parametrize("spec", [
    dict(gamma="p_y", residual="teacher", top_k=5),
    dict(gamma="topk_entropy", residual="geometric_mix", eta=0.7, k=10, top_k=20),
    dict(gamma="ratio", residual="reference", lam=0.2),
    dict(gamma=0.3, residual="uniform"),
    dict(gamma="data_weight", residual="tempered", beta=2.0, top_k=3),
    dict(gamma="threshold", residual="student", tau=0.01),
])
def test_general_target_compositions(spec):
    obj = qtarget.target(**spec)
    c = make_inputs((40,), seed=11)
    assert_same(*run_both(obj, c, chunk_size=16, bias=True, softcap=10.0))


def test_user_registered_objective():
    class Squared(qtarget.Objective):
        name = "squared_margin"

        def terms(self, x):
            top2 = x.logits.topk(2, -1).values
            return qtarget.TokenTerms(loss=(top2[:, 0] - x.logits.gather(-1, x.labels[:, None])[:, 0]) ** 2
                                      + 0.01 * x.logits.pow(2).mean(-1), gamma=x.p_y_detached)

    c = make_inputs((31,), seed=2)
    assert_same(*run_both(Squared(), c, chunk_size=7, scale=0.5))


@pytest.mark.parametrize("reduction", ["sum", "sequence_mean"])
def test_reductions(reduction):
    obj = qtarget.get_objective("dft")
    c = make_inputs((3, 11), seed=8)
    assert_same(*run_both(obj, c, reduction=reduction, chunk_size=5))


def test_gradient_accumulation_with_normalizer_equals_full_batch():
    obj = qtarget.get_objective("target_sft", eta=0.5)
    c = make_inputs((4, 15), seed=9)
    h, W, b = leaves(c)
    total = int((c["labels"] != -100).sum())
    for part in (slice(0, 1), slice(1, 4)):
        fused_token_loss(obj, h[part], W, c["labels"][part], lm_head_bias=b, normalizer=total, chunk_size=8,
                         teacher_hidden=c["teacher_hidden"][part], teacher_head=c["teacher_head"]).loss.backward()
    h2, W2, b2 = leaves(c)
    token_loss(obj, full_logits(h2, W2, b2), c["labels"],
               teacher_logits=c["teacher_hidden"] @ c["teacher_head"].T).loss.backward()
    for a, bb in ((h, h2), (W, W2), (b, b2)):
        assert_rel(a.grad, bb.grad, 1e-5)


def test_all_masked_gives_zero_loss_and_zero_grads():
    c = make_inputs((2, 6), seed=1)
    h, W, b = leaves(c)
    labels = torch.full((2, 6), -100)
    out = fused_token_loss("asft", h, W, labels, lm_head_bias=b, ref_hidden=c["ref_hidden"],
                           ref_head=c["ref_head"])
    assert float(out.loss.detach()) == 0.0 and out.metrics["n_tokens"] == 0.0
    out.loss.backward()
    assert torch.all(h.grad == 0) and torch.all(W.grad == 0) and torch.all(b.grad == 0)
    assert torch.all(out.per_token == 0) and out.per_token.shape == labels.shape


def test_masked_positions_get_zero_hidden_gradient():
    c = make_inputs((5, 8), seed=4)
    h, W, _ = leaves(c, bias=False)
    fused_token_loss("label_smoothing", h, W, c["labels"], chunk_size=4).loss.backward()
    masked = c["labels"] == -100
    assert masked.any() and torch.all(h.grad[masked] == 0) and torch.all(h.grad[~masked].abs().sum(-1) > 0)


def test_tied_embeddings_get_both_gradients():
    """The head weight is also the input embedding: its gradient sums both uses."""
    torch.manual_seed(0)
    emb = torch.nn.Embedding(V, H)
    proj = torch.nn.Linear(H, H)
    ids = torch.randint(0, V, (3, 10))
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = -100
    grads = []
    for fused in (True, False):
        emb.zero_grad(), proj.zero_grad()
        hidden = torch.tanh(proj(emb(ids)))
        if fused:
            loss = fused_token_loss("dft", hidden, emb.weight, labels, chunk_size=7).loss
        else:
            loss = token_loss("dft", hidden @ emb.weight.T, labels).loss
        loss.backward()
        grads.append((emb.weight.grad.clone(), proj.weight.grad.clone()))
    assert_rel(grads[0][0], grads[1][0], 1e-5, "tied weight")
    assert_rel(grads[0][1], grads[1][1], 1e-5, "upstream layer")


@pytest.mark.parametrize("mode", ["forward", "recompute"])
def test_frozen_head_computes_no_weight_gradient(mode, monkeypatch):
    calls = []
    real = chunked_mod._accumulate_weight_grad
    monkeypatch.setattr(chunked_mod, "_accumulate_weight_grad", lambda *a: (calls.append(1), real(*a)))
    c = make_inputs((30,), seed=6)
    h = c["hidden"].clone().requires_grad_(True)
    W = c["weight"]  # requires_grad=False: a frozen head (LoRA elsewhere)
    out = fused_token_loss("sft", h, W, c["labels"], chunk_size=8, mode=mode)
    out.loss.backward()
    assert calls == [] and W.grad is None
    h2 = c["hidden"].clone().requires_grad_(True)
    token_loss("sft", h2 @ W.T, c["labels"]).loss.backward()
    assert_rel(h.grad, h2.grad, 1e-5)


def test_no_grad_path_equals_reference():
    c = make_inputs((20,), seed=7)
    with torch.no_grad():
        got = fused_token_loss("sft_kl", c["hidden"], c["weight"], c["labels"], ref_hidden=c["ref_hidden"],
                               ref_head=c["ref_head"], chunk_size=3)
        want = token_loss("sft_kl", c["hidden"] @ c["weight"].T, c["labels"],
                          ref_logits=c["ref_hidden"] @ c["ref_head"].T)
    assert not got.loss.requires_grad
    assert float(got.loss.detach()) == pytest.approx(float(want.loss.detach()), rel=1e-5)
    assert got.metrics["kl_ref"] == pytest.approx(want.metrics["kl_ref"], rel=1e-4)


def test_second_backward():
    c = make_inputs((20,), seed=7)
    h, W, _ = leaves(c, bias=False)
    out = fused_token_loss("dft", h, W, c["labels"], mode="recompute")
    out.loss.backward(retain_graph=True)
    first = h.grad.clone()
    out.loss.backward()
    assert_rel(h.grad, 2 * first, 1e-6)
    out = fused_token_loss("dft", h, W, c["labels"], mode="forward")
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="recompute"):
        out.loss.backward()


def test_grad_output_scales_gradients():
    """The loss need not be the end of the graph: 3 * loss + other terms."""
    c = make_inputs((20,), seed=12)
    h, W, b = leaves(c)
    out = fused_token_loss("psft", h, W, c["labels"], lm_head_bias=b, old_logprobs=c["old_logprobs"])
    (3.0 * out.loss + h.sum()).backward()
    h2, W2, b2 = leaves(c)
    (3.0 * token_loss("psft", full_logits(h2, W2, b2), c["labels"], old_logprobs=c["old_logprobs"]).loss
     + h2.sum()).backward()
    for a, bb in ((h, h2), (W, W2), (b, b2)):
        assert_rel(a.grad, bb.grad, 1e-5)


# ------------------------------------------------------------------------------------ dtypes
@pytest.mark.parametrize("name", ["sft", "dft", "target_sft", "asft"])
def test_bf16_inputs_within_bf16_tolerance(name):
    """bf16 hidden/head vs the float32 reference on the same (bf16-representable) values."""
    obj = qtarget.get_objective(name, **CATALOGUE_PARAMS[name])
    c16 = make_inputs((40,), seed=13, dtype=torch.bfloat16)
    c32 = {k: (v.float() if v.dtype == torch.bfloat16 else v) for k, v in c16.items()}
    h, W, b = leaves(c16)
    got = fused_token_loss(obj, h, W, c16["labels"], lm_head_bias=b, chunk_size=16, **aux_kwargs(obj, c16, False))
    gh, gW, gb = torch.autograd.grad(got.loss, [h, W, b])
    assert gh.dtype == gW.dtype == gb.dtype == torch.bfloat16
    h2, W2, b2 = leaves(c32)
    want = token_loss(obj, full_logits(h2, W2, b2), c32["labels"], **aux_kwargs(obj, c32, True))
    wh, wW, wb = torch.autograd.grad(want.loss, [h2, W2, b2])
    assert float(got.loss.detach()) == pytest.approx(float(want.loss.detach()), rel=3e-2, abs=1e-3)
    for a, bb, what in ((gh, wh, "hidden"), (gW, wW, "weight"), (gb, wb, "bias")):
        assert_rel(a.float(), bb, 5e-2, what)


@pytest.mark.parametrize("name", ["sft", "target_sft"])
def test_autocast_bf16_matches_autocast_reference(name):
    obj = qtarget.get_objective(name, **CATALOGUE_PARAMS[name])
    c = make_inputs((2, 19), seed=14)
    h, W, b = leaves(c)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fused_token_loss(obj, h, W, c["labels"], lm_head_bias=b, chunk_size=8, **aux_kwargs(obj, c, False))
    gh, gW, gb = torch.autograd.grad(got.loss, [h, W, b])
    assert got.loss.dtype == torch.float32 and gW.dtype == torch.float32  # fp32 master weights keep fp32 grads
    h2, W2, b2 = leaves(c)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = F.linear(h2, W2, b2)
        teacher = (c["teacher_hidden"] @ c["teacher_head"].T) if "teacher" in obj.needs else None
        assert logits.dtype == torch.bfloat16
        want = token_loss(obj, logits, c["labels"], teacher_logits=teacher)
    wh, wW, wb = torch.autograd.grad(want.loss, [h2, W2, b2])
    assert float(got.loss.detach()) == pytest.approx(float(want.loss.detach()), rel=1e-2)
    # same bf16 logits up to chunked-GEMM rounding: much closer than to the fp32 result
    for a, bb, what in ((gh, wh, "hidden"), (gW, wW, "weight"), (gb, wb, "bias")):
        assert_rel(a, bb, 3e-2, what)


@pytest.mark.parametrize("name", ["prob", "sft_kl"])
def test_gradcheck_float64(name):
    """Finite differences of the loss value; only for objectives without stop-gradients inside, whose
    gradient is the derivative of the value (DFT-like losses are not)."""
    obj = qtarget.get_objective(name, **CATALOGUE_PARAMS[name])
    c = make_inputs((6,), seed=15, hidden_size=4, vocab=11, dtype=torch.float64, teacher_hidden_size=3)
    c["labels"][0] = -100
    kw = aux_kwargs(obj, c, False)
    if "old_logprobs" in kw:
        kw["old_logprobs"] = kw["old_logprobs"].double()
    h, W, b = leaves(c)

    def f(h, W, b):
        return fused_token_loss(obj, h, W, c["labels"], lm_head_bias=b, softcap=3.0, chunk_size=2,
                                mode="recompute", **kw).loss

    assert torch.autograd.gradcheck(f, (h, W, b), eps=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------ errors
def test_errors_name_the_argument():
    c = make_inputs((10,), seed=0)
    h, W, y = c["hidden"], c["weight"], c["labels"]
    with pytest.raises(ValueError, match=r"teacher_head` gives logits over 999 tokens .* has 1000"):
        fused_token_loss("kd", h, W, y, teacher_hidden=c["teacher_hidden"], teacher_head=c["teacher_head"][:999])
    with pytest.raises(ValueError, match="teacher_logits"):
        fused_token_loss("kd", h, W, y)
    with pytest.raises(ValueError, match="hidden shape"):
        fused_token_loss("sft", h[:9], W, y)
    with pytest.raises(ValueError, match="hidden size"):
        fused_token_loss("sft", h, W[:, :5], y)
    with pytest.raises(ValueError, match="lm_head` bias"):
        fused_token_loss("sft", h, W, y, lm_head_bias=torch.zeros(7))
    with pytest.raises(ValueError, match=r"labels contain 1000"):
        fused_token_loss("sft", h, W, torch.full_like(y, 1000))
    bad = h.clone()
    bad[3, 2] = float("nan")
    with pytest.raises(ValueError, match="`hidden` contains 1 NaN"):
        fused_token_loss("sft", bad, W, y)
    fused_token_loss("sft", bad, W, torch.full_like(y, -100), check_finite=False)
    with pytest.raises(ValueError, match="mode"):
        fused_token_loss("sft", h, W, y, mode="fast")
    with pytest.raises(ValueError, match="chunk_size"):
        fused_token_loss("sft", h, W, y, chunk_size=0)
    with pytest.raises(ValueError, match="together"):
        fused_token_loss("kd", h, W, y, teacher_hidden=c["teacher_hidden"])
    with pytest.raises(ValueError, match="one source for the teacher"):
        fused_token_loss("kd", h, W, y, teacher_hidden=c["teacher_hidden"], teacher_head=c["teacher_head"],
                         teacher_logits=torch.zeros(10, V))


def test_chunk_size_from_budget(monkeypatch):
    monkeypatch.delenv(BUDGET_ENV, raising=False)
    assert chunk_rows(1000, 0, 2**20) == (2**20 // (4 * 1000 * TEMPORARIES_STUDENT)) // 8 * 8
    assert chunk_rows(1000, 2, 2**20) == (2**20 // (4 * 1000 * (TEMPORARIES_STUDENT + 2 * TEMPORARIES_PER_AUX))) // 8 * 8
    assert chunk_rows(151936, 0, 1) == 8  # never below one block of rows
    default = chunk_rows(49152)
    assert default == (DEFAULT_BUDGET_BYTES // (4 * 49152 * TEMPORARIES_STUDENT)) // 8 * 8
    monkeypatch.setenv(BUDGET_ENV, str(DEFAULT_BUDGET_BYTES / 2**20 / 2))
    assert chunk_rows(49152) == pytest.approx(default / 2, abs=8)
    monkeypatch.setenv(BUDGET_ENV, "lots")
    with pytest.raises(ValueError, match=BUDGET_ENV):
        chunk_rows(49152)


def test_memory_budget_sets_chunk_rows_and_metrics_can_be_skipped():
    class Counting(qtarget.Objective):
        name = "counting_sft"

        def __init__(self):
            super().__init__()
            self.rows = []

        def terms(self, x):
            self.rows.append(x.logits.shape[0])
            return qtarget.TokenTerms(loss=-x.logp_y, gamma=torch.ones_like(x.p_y_detached))

    c = make_inputs((100,), seed=21)
    n = int((c["labels"] != -100).sum())
    obj = Counting()
    budget = 4 * V * TEMPORARIES_STUDENT * 16  # 16 rows per chunk
    h, W, _ = leaves(c, bias=False)
    out = fused_token_loss(obj, h, W, c["labels"], memory_budget=budget, metrics=False)
    assert obj.rows == [16] * (n // 16) + ([n % 16] if n % 16 else [])
    assert out.metrics == {}
    want = token_loss("sft", c["hidden"] @ c["weight"].T, c["labels"])
    assert float(out.loss.detach()) == pytest.approx(float(want.loss), rel=1e-5)
