"""Token-level objectives published since DFT (late 2025 - 2026), each as its authors' code computes it.

Every one here re-weights the label's log-probability (or its probability) with a detached weight, so
its gradient is c (p - Q) with Q = gamma delta_y + (1 - gamma) sg(p) and c = 1; gamma is given per
class. Sources (file and commit) and every deliberate difference are listed in docs/objectives.md.
"""
from __future__ import annotations

import torch

from qtarget.objectives.base import Objective, TokenInputs, TokenTerms, check_range
from qtarget.objectives.rules import GammaRule, LabelProbGamma, MassGamma, ReferenceSourcedGamma

SIDES = ("above", "below")


class WeightedNLL(Objective):
    """-sg(w) log p_y with w from a gamma rule; gamma = w, pi_tilde = sg(p)."""

    def __init__(self, weight: GammaRule, name: str, **shown: float | str) -> None:
        super().__init__(**shown)
        self.weight_rule = weight
        self.needs = frozenset(weight.needs)
        self.name = name

    def terms(self, x: TokenInputs) -> TokenTerms:
        w = self.weight_rule(x).detach()
        return TokenTerms(loss=-w * x.logp_y, gamma=w)


def _side_mask(x: TokenInputs, q: float, side: str) -> torch.Tensor:
    """[n] 1[sg(p_y) >= q] (side "above") or 1[sg(p_y) <= q] ("below"), as float."""
    p_y = x.p_y_detached
    keep = p_y >= q if side == "above" else p_y <= q
    return keep.to(p_y.dtype)


def _check_side(side: str, objective: str) -> str:
    if side not in SIDES:
        raise ValueError(f"objective {objective!r}: parameter `side` must be one of {', '.join(SIDES)}, got {side!r}")
    return side


class _SideGamma(GammaRule):
    name = "side_threshold"

    def __init__(self, q: float, side: str) -> None:
        super().__init__(q=q, side=side)

    def __call__(self, x):
        return _side_mask(x, self.params["q"], self.params["side"])


def nll_masked(q: float = 0.1, side: str = "above") -> Objective:
    """-log p_y * 1[sg(p_y) >= q] ("above") or * 1[sg(p_y) <= q] ("below") (Beyond Log Likelihood:
    OnlyTopLogP / OnlyBottomLogP); gamma = the mask, pi_tilde = sg(p)."""
    q = check_range("q", q, 0.0, 1.0, objective="nll_masked")
    side = _check_side(side, "nll_masked")
    return WeightedNLL(_SideGamma(q, side), "nll_masked", q=q, side=side)


class ProbMasked(Objective):
    """(1 - p_y) * 1[sg(p_y) >= q] ("above") or * 1[sg(p_y) <= q] ("below") (Beyond Log Likelihood:
    OnlyTopP / OnlyBottomP); gamma = mask * p_y, pi_tilde = sg(p)."""

    name = "prob_masked"

    def __init__(self, q: float = 0.1, side: str = "above") -> None:
        super().__init__(q=check_range("q", q, 0.0, 1.0, objective="prob_masked"),
                         side=_check_side(side, "prob_masked"))

    def terms(self, x):
        mask = _side_mask(x, self.params["q"], self.params["side"])
        p_y = x.logp_y.exp()
        return TokenTerms(loss=mask * (1.0 - p_y), gamma=mask * x.p_y_detached)


def prift_prob() -> Objective:
    """-sg(p_ref(y)) log p_y (PriFT-prob): DFT's weight read from the frozen pretrained model (`ref`);
    gamma = p_ref(y), pi_tilde = sg(p)."""
    return WeightedNLL(ReferenceSourcedGamma(LabelProbGamma()), "prift_prob")


def prift_mass(tau: float = 0.5) -> Objective:
    """-1[u_ref >= tau] log p_y (PriFT-mass), u_ref = sum_v q_v 1[q_v < q_y] + q_y under the frozen
    pretrained model q (`ref`); gamma = the mask, pi_tilde = sg(p)."""
    rule = MassGamma(check_range("tau", tau, 0.0, 1.0, objective="prift_mass"))
    return WeightedNLL(ReferenceSourcedGamma(rule), "prift_mass", tau=rule.params["tau"])


class DEFT(Objective):
    """(1 - p_y^a) / (a + eps), a = sg(sum_v p_v^2) (Dynamic Entropy Fine-Tuning: the Renyi-2
    concentration sets the exponent of Beyond-log's (1 - p^a)/a per token; eps = 1e-6 as in the code);
    gamma = a / (a + eps) * p_y^a, pi_tilde = sg(p)."""

    name = "deft"
    eps = 1e-6

    def __init__(self) -> None:
        super().__init__()

    def concentration(self, x: TokenInputs) -> torch.Tensor:
        return x.p_detached.pow(2).sum(-1)

    def terms(self, x):
        a = self.concentration(x)
        p_pow = torch.exp(a * x.logp_y)
        gamma = (a / (a + self.eps) * p_pow).detach()
        return TokenTerms(loss=(1.0 - p_pow) / (a + self.eps), gamma=gamma, extras={"concentration": a})
