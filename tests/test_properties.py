"""Property tests: Q is a probability distribution for every objective whose Q is one (all but the
signed targets of gem and psft with r > 1)."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qtarget

DISTRIBUTION_OBJECTIVES = {
    "sft": {}, "label_smoothing": {"lam": 0.3}, "dft": {}, "prob": {"alpha": 0.7}, "profit": {"tau": 0.2},
    "eaft": {"k": 4, "alpha": 1.0}, "token_weighted": {}, "sft_kl": {"lam": 0.5}, "asft": {"lam": 0.05},
    "kd": {"temperature": 1.5}, "distill_hybrid": {"lam": 0.3}, "target_sft": {"eta": 0.5},
    "prob_masked": {"q": 0.1, "side": "above"}, "nll_masked": {"q": 0.3, "side": "below"}, "prift_prob": {},
    "prift_mass": {"tau": 0.5}, "deft": {},
}


@st.composite
def cases(draw):
    n = draw(st.integers(1, 4))
    V = draw(st.integers(5, 40))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([0.1, 3.0, 20.0, 50.0]))
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, V, generator=g) * scale).clamp(-50, 50)
    y = torch.randint(0, V, (n,), generator=g)
    aux = {"teacher_logits": (torch.randn(n, V, generator=g) * scale).clamp(-50, 50),
           "ref_logits": (torch.randn(n, V, generator=g) * scale).clamp(-50, 50),
           "old_logprobs": torch.randn(n, generator=g) - 1.0, "token_weights": torch.rand(n, generator=g)}
    return z, y, aux


def _assert_distribution(Q):
    assert torch.all(Q >= -1e-5), float(Q.min())
    torch.testing.assert_close(Q.sum(-1), torch.ones(Q.shape[0]), rtol=0, atol=1e-4)


@settings(max_examples=40, deadline=None)
@given(case=cases(), name=st.sampled_from(sorted(DISTRIBUTION_OBJECTIVES)))
def test_implied_target_is_a_distribution(case, name):
    z, y, aux = case
    _assert_distribution(qtarget.implied_target(qtarget.get_objective(name, **DISTRIBUTION_OBJECTIVES[name]),
                                                z, y, **aux))


@settings(max_examples=30, deadline=None)
@given(case=cases(), gamma=st.sampled_from(["p_y", "power", "threshold", "ratio", "data_weight", 0.3]),
       residual=st.sampled_from(["uniform", "student", "tempered", "reference", "teacher", "geometric_mix"]),
       top_k=st.sampled_from([None, 3]))
def test_general_target_is_a_distribution(case, gamma, residual, top_k):
    z, y, aux = case
    _assert_distribution(qtarget.implied_target(qtarget.target(gamma=gamma, residual=residual, top_k=top_k),
                                                z, y, **aux))


@settings(max_examples=30, deadline=None)
@given(case=cases())
def test_psft_target_is_a_distribution_when_ratio_at_most_one(case):
    z, y, aux = case
    logp_y = torch.log_softmax(z, -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
    old = logp_y + torch.rand(y.shape)  # r = exp(logp_y - old) <= 1
    _assert_distribution(qtarget.implied_target("psft", z, y, old_logprobs=old))
