"""The fused engine does not wait on the device once per chunk.

On a GPU, anything that needs a tensor's value on the host (`.item()`, `bool(t)`, `float(t)`,
`.tolist()`, `nonzero`, boolean-mask indexing, `masked_select`, `unique`) blocks the CPU until the
device has caught up, and once per chunk that serialises the whole loop. On CPU there is no device to
wait for, so the test counts the operators that *would* synchronise, at the ATen level (a
TorchDispatchMode sees every op below autograd, the engine's own and its objectives'): the count per
fwd+bwd must not depend on the number of chunks, and must stay a small constant (input checks, the
supervised-row selection, the metric means)."""
from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import qtarget
from objective_formulas import CATALOGUE_PARAMS
from qtarget.models.head import LMHead
from qtarget.objectives.base import Objective, TokenInputs, TokenTerms, cross_entropy_to
from qtarget.ops import kernels
from qtarget.ops.sparse_teacher import topk_from_logits

aten = torch.ops.aten
SYNCING = {aten._local_scalar_dense.default: "item/bool/float", aten.nonzero.default: "nonzero",
           aten.masked_select.default: "masked_select", aten._unique2.default: "unique",
           aten.unique_consecutive.default: "unique", aten.repeat_interleave.Tensor: "repeat_interleave"}


class CountSyncs(TorchDispatchMode):
    """Counts ATen ops that need a device tensor's value on the host."""

    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SYNCING:
            self.counts[SYNCING[func]] += 1
        elif func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default):
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(i is not None and i.dtype == torch.bool for i in indices):
                self.counts["boolean-mask index"] += 1
        return func(*args, **kwargs)


def problem(n_rows=96, H=16, V=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n_rows, H, generator=g)
    W = torch.randn(V, H, generator=g) * (2.0 / math.sqrt(H))
    y = torch.randint(0, V, (n_rows,), generator=g)
    y[::7] = -100
    logp_y = torch.log_softmax(h @ W.T, -1).gather(-1, y.clamp_min(0)[:, None]).squeeze(-1)
    aux = {"teacher_hidden": torch.randn(n_rows, 12, generator=g),
           "teacher_head": LMHead(torch.randn(V, 12, generator=g) * 0.5),
           "ref_hidden": h + 0.1 * torch.randn(h.shape, generator=g), "ref_head": LMHead(W.clone()),
           "old_logprobs": logp_y + 0.3 * torch.randn(n_rows, generator=g),
           "token_weights": torch.rand(n_rows, generator=g)}
    return h, W, y, aux


def syncs(objective, chunk_size, **extra):
    h, W, y, aux = problem()
    kw = {}
    for need, keys in (("teacher", ("teacher_hidden", "teacher_head")), ("ref", ("ref_hidden", "ref_head")),
                       ("old_logprobs", ("old_logprobs",)), ("token_weights", ("token_weights",))):
        if need in objective.needs and not (need == "teacher" and "teacher_topk" in extra):
            kw.update({k: aux[k] for k in keys})
    kw.update(extra)
    hb, Wb = h.clone().requires_grad_(True), W.clone().requires_grad_(True)
    with CountSyncs() as mode:
        out = qtarget.fused_token_loss(objective, hb, Wb, y, chunk_size=chunk_size, **kw)
        out.loss.backward()
    return mode.counts


KERNEL_ENVS = {"closed_form": {kernels.CLOSED_FORM_ENV: "1", kernels.COMPILE_ENV: "0"},
               "autograd": {kernels.CLOSED_FORM_ENV: "0"}}


@pytest.mark.parametrize("path", list(KERNEL_ENVS))
@pytest.mark.parametrize("name", list(CATALOGUE_PARAMS))
def test_syncs_per_call_do_not_grow_with_chunks(name, path, monkeypatch):
    """Every catalogue objective on both eager kernels (the closed form, the default; autograd over
    the objective's own `terms`, the fallback and reference): no host sync per chunk."""
    for key, value in KERNEL_ENVS[path].items():
        monkeypatch.setenv(key, value)
    obj = qtarget.get_objective(name, **CATALOGUE_PARAMS[name])
    few, many = syncs(obj, 48), syncs(obj, 8)  # 2 chunks vs 11
    assert few == many, (few, many)
    assert sum(many.values()) <= 25, many


def test_sparse_teacher_syncs_do_not_grow_with_chunks():
    h, W, y, aux = problem()
    t_logits = aux["teacher_hidden"] @ aux["teacher_head"].weight.T
    topk = topk_from_logits(t_logits, k=20)
    obj = qtarget.get_objective("target_sft", eta=0.5)
    for tail in ("student", "renormalize"):
        few = syncs(obj, 48, teacher_topk=topk, teacher_tail=tail)
        many = syncs(obj, 8, teacher_topk=topk, teacher_tail=tail)
        assert few == many and sum(many.values()) <= 40, (tail, few, many)


class SkipsWhenSure(Objective):
    """A user objective with a per-chunk host sync: sft, plus a residual term skipped when every
    p_y is above 1/2 (`bool(...)` on a tensor, as `TargetObjective.terms` once did for gamma == 1)."""

    name = "skips_when_sure"

    def terms(self, x):
        loss = -x.logp_y
        if not bool((x.p_y_detached > 0.5).all()):
            loss = loss + 0.1 * cross_entropy_to(x.logp.detach(), x.logp)
        return TokenTerms(loss=loss, gamma=torch.ones_like(loss))


def test_the_counter_sees_syncs():
    """The counter is not blind: one `bool(...)` per chunk in an objective shows as a count growing
    with the number of chunks (2 -> 11)."""
    few, many = syncs(SkipsWhenSure(), 48), syncs(SkipsWhenSure(), 8)
    assert many["item/bool/float"] - few["item/bool/float"] == 11 - 2


def test_constant_gamma_one_skips_the_residual_without_a_sync():
    """target(gamma = 1, ...) is plain sft (the residual skipped, decided from the rule, not from
    gamma's values), and gamma = 1 - tiny still mixes the residual in."""
    h, W, y, _ = problem()
    y = y.clamp_min(0)
    with CountSyncs() as mode:
        x = TokenInputs(logits=h @ W.T, labels=y)
        terms = qtarget.target(gamma=1.0, residual="uniform").terms(x)
    assert sum(mode.counts.values()) == 0, mode.counts
    assert torch.equal(terms.loss, -x.logp_y)
    x = TokenInputs(logits=h @ W.T, labels=y)
    mixed = qtarget.target(gamma=1.0 - 1e-3, residual="uniform").terms(x)
    uniform_ce = -x.logp.mean(-1)
    assert torch.allclose(mixed.loss, (1 - 1e-3) * -x.logp_y + 1e-3 * uniform_ce, rtol=1e-6)
