"""Token-level objectives added after the 2026 catalogue: GIFT, SED-SFT and TALR, each as the code
named in docs/objectives.md computes it.

- GIFT is a reference-anchored target, Q ∝ pi_tilde * exp(beta * 1[v = y]) with pi_tilde the frozen
  reference (smoothed as the code does); its loss is CE(Q, p), built as a `TargetObjective`.
- SED-SFT is NLL plus s * 1[top-k mass < tau] * (p_y - 1/2)^2; its target is delta_y with a
  per-token scale c = 1 - s * m * p_y (2 p_y - 1).
- TALR is -sg(w) log p_y with w = max(max(p_y, 1e-6)^(1/tau), floor) (fixed tau).
"""
from __future__ import annotations

import math

import torch

from qtarget.objectives.base import Objective, TokenInputs, TokenTerms, check_range
from qtarget.objectives.catalog import TargetObjective
from qtarget.objectives.catalog_2026 import WeightedNLL
from qtarget.objectives.rules import GammaRule, ResidualRule, log_expm1

GIFT_FLOOR = 1e-10  # GIFT's code: log(mixed_ref_probs + 1e-10)
TALR_MIN_PROB = 1e-6  # the TALR port: p_y clamped to >= 1e-6 before the power


class SmoothedReferenceResidual(ResidualRule):
    """pi_tilde ∝ (1 - smooth) pi_ref + smooth / V + 1e-10: GIFT's reference, mixed with the uniform
    distribution by `smooth` (the code's smooth_lambda) and floored by 1e-10 before the log."""

    name = "smoothed_reference"
    needs = frozenset({"ref"})

    def __init__(self, smooth: float = 0.0) -> None:
        super().__init__(smooth=check_range("smooth", smooth, 0.0, 1.0, objective="gift"))

    def log_probs(self, x):
        cache = x.__dict__.setdefault("_gift_residual", {})
        key = self.params["smooth"]
        if key not in cache:
            lam, V = self.params["smooth"], x.logits.shape[-1]
            mixed = x.ref_logp.detach().exp()
            if lam > 0.0:
                mixed = (1.0 - lam) * mixed + lam / V
            cache[key] = torch.log_softmax(torch.log(mixed + GIFT_FLOOR), dim=-1)
        return cache[key]


class GiftGamma(GammaRule):
    """gamma = (e^beta - 1) pi_tilde(y) / (1 + (e^beta - 1) pi_tilde(y)) with pi_tilde the residual's own
    distribution, so gamma delta_y + (1 - gamma) pi_tilde = softmax(log pi_tilde + beta delta_y)."""

    name = "gift"
    reads_model = False

    def __init__(self, beta: float, residual: ResidualRule) -> None:
        super().__init__(beta=beta)
        self.residual = residual
        self.needs = residual.needs

    def __call__(self, x):
        log_pi_y = self.residual.log_probs(x).gather(-1, x.labels.unsqueeze(-1)).squeeze(-1)
        return torch.sigmoid(log_expm1(self.params["beta"]) + log_pi_y)


def gift(beta: float = 20.0, smooth: float = 0.0) -> TargetObjective:
    """CE(Q, p), Q = softmax(log pi_tilde + beta 1[v = y]), pi_tilde = the frozen reference (GIFT;
    `smooth` = the code's smooth_lambda); gamma = (e^beta - 1) pi_tilde_y / (1 + (e^beta - 1) pi_tilde_y)."""
    beta = float(beta)
    if not (math.isfinite(beta) and beta >= 0.0):
        raise ValueError(f"objective 'gift': parameter `beta` must be a finite number >= 0, got {beta}")
    residual = SmoothedReferenceResidual(smooth)
    return TargetObjective(GiftGamma(beta, residual), residual, name="gift", beta=beta,
                           smooth=residual.params["smooth"])


class SEDSFT(Objective):
    """-log p_y + s * m * (p_y (p_y - 1) + 1/4), m = 1[sum of the top-k of sg(p) < tau] (SED-SFT's
    selective regulariser, which pushes p_y of the selected tokens toward 1/2); gamma = 1 (Q = delta_y),
    c = 1 - s m sg(p_y) (2 sg(p_y) - 1)."""

    name = "sed_sft"

    def __init__(self, scale: float = 1.0, k: int = 2, tau: float = 0.95) -> None:
        if int(k) < 1:
            raise ValueError(f"objective 'sed_sft': parameter `k` must be >= 1, got {k}")
        super().__init__(scale=check_range("scale", scale, 0.0, 1.0, objective="sed_sft"), k=int(k),
                         tau=check_range("tau", tau, 0.0, 1.0, objective="sed_sft"))

    def selected(self, x: TokenInputs) -> torch.Tensor:
        """[n] 1[top-k mass of sg(p) < tau] as float (the tokens the regulariser applies to)."""
        p = x.p_detached
        top = p.topk(min(self.params["k"], p.shape[-1]), dim=-1).values.sum(-1)
        return (top < self.params["tau"]).to(p.dtype)

    def terms(self, x):
        m = self.selected(x)
        p_y = x.logp_y.exp()
        extra = self.params["scale"] * m * (p_y * (p_y - 1.0) + 0.25)
        return TokenTerms(loss=-x.logp_y + extra, gamma=torch.ones_like(x.p_y_detached),
                          extras={"selected": m})

    def implied_scale(self, x):
        p_y = x.p_y_detached
        return 1.0 - self.params["scale"] * self.selected(x) * p_y * (2.0 * p_y - 1.0)


class TALRGamma(GammaRule):
    """w = max(max(sg(p_y), 1e-6)^(1/tau), floor) (TALR's token weight)."""

    name = "talr"

    def __init__(self, tau: float, floor: float) -> None:
        super().__init__(tau=tau, floor=floor)

    def __call__(self, x):
        log_p = x.logp_y.detach().clamp_min(math.log(TALR_MIN_PROB))
        return torch.exp(log_p / self.params["tau"]).clamp_min(self.params["floor"])


def talr(tau: float = 1.0, floor: float = 0.01) -> Objective:
    """-sg(w) log p_y, w = max(max(p_y, 1e-6)^(1/tau), floor) (TALR with a fixed tau); gamma = w,
    pi_tilde = sg(p)."""
    tau = float(tau)
    if not (math.isfinite(tau) and tau > 0.0):
        raise ValueError(f"objective 'talr': parameter `tau` must be a finite number > 0, got {tau}")
    floor = check_range("floor", floor, 0.0, 1.0, objective="talr")
    return WeightedNLL(TALRGamma(tau, floor), "talr", tau=tau, floor=floor)
