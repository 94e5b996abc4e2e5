"""The named objectives of SPEC §2, each written as its paper's per-token loss.

Where a method's loss *is* CE(Q, p) for a (gamma, residual) pair, it is built from `TargetObjective`
(label_smoothing, kd, target_sft); the others keep their own loss value (DFT's value is not CE(Q, p),
only its gradient is) and declare gamma and the implied scale c of dL/dz = c (p - Q).
"""
from __future__ import annotations

import torch

from qtarget.objectives.base import Objective, TokenInputs, TokenTerms, check_range, cross_entropy_to, kl_to
from qtarget.objectives.rules import (
    ConstantGamma,
    GammaRule,
    GeometricMixResidual,
    LabelProbGamma,
    ResidualRule,
    TeacherResidual,
    UniformResidual,
    topk_entropy_ratio,
)


class TargetObjective(Objective):
    """L = gamma * CE(delta_y, p) + (1 - gamma) * CE(pi_tilde, p), gamma and pi_tilde detached."""

    name = "target"

    def __init__(self, gamma: GammaRule, residual: ResidualRule, name: str | None = None, **shown: float) -> None:
        super().__init__(**(shown or {"gamma": gamma, "residual": residual}))
        self.gamma_rule, self.residual_rule = gamma, residual
        self.needs = frozenset(gamma.needs | residual.needs)
        if name:
            self.name = name

    def terms(self, x: TokenInputs) -> TokenTerms:
        gamma = self.gamma_rule(x)
        # A constant gamma = 1 is plain SFT: the residual is skipped. Decided from the rule, not from
        # gamma's values, which would need them on the host (a device sync per chunk on a GPU).
        if isinstance(self.gamma_rule, ConstantGamma) and self.gamma_rule.params["value"] == 1.0:
            return TokenTerms(loss=-x.logp_y, gamma=gamma)
        residual_ce = cross_entropy_to(self.residual_rule.log_probs(x), x.logp)
        return TokenTerms(loss=-gamma * x.logp_y + (1.0 - gamma) * residual_ce, gamma=gamma)

    @property
    def teacher_temperature(self) -> float:
        rule = self.residual_rule
        rule = rule.params.get("inner", rule)  # a top-k truncated residual
        return float(rule.params.get("temperature", 1.0))


class SFT(Objective):
    """-log p_y."""

    name = "sft"

    def terms(self, x):
        return TokenTerms(loss=-x.logp_y, gamma=torch.ones_like(x.p_y_detached))


def label_smoothing(lam: float = 0.1) -> TargetObjective:
    """-(1-lam) log p_y - (lam/V) sum_v log p_v == torch's cross_entropy(label_smoothing=lam)."""
    lam = check_range("lam", lam, 0.0, 1.0, objective="label_smoothing")
    return TargetObjective(ConstantGamma(1.0 - lam), UniformResidual(), name="label_smoothing", lam=lam)


class DFT(Objective):
    """-sg(p_y) log p_y (Dynamic Fine-Tuning); gamma = p_y, pi_tilde = sg(p)."""

    name = "dft"

    def terms(self, x):
        return TokenTerms(loss=-x.p_y_detached * x.logp_y, gamma=x.p_y_detached)


class Prob(Objective):
    """(1 - p_y^alpha) / alpha (Beyond-log); gamma = p_y^alpha, pi_tilde = sg(p)."""

    name = "prob"

    def __init__(self, alpha: float = 1.0) -> None:
        if float(alpha) <= 0:
            raise ValueError(f"objective 'prob': parameter `alpha` must be > 0, got {alpha}")
        super().__init__(alpha=float(alpha))

    def terms(self, x):
        alpha = self.params["alpha"]
        p_pow = torch.exp(alpha * x.logp_y)
        return TokenTerms(loss=(1.0 - p_pow) / alpha, gamma=p_pow.detach())


class ProFit(Objective):
    """-1[sg(p_y) >= tau] log p_y; gamma = 1[p_y >= tau], pi_tilde = sg(p). (The official code masks
    p_y < tau, so p_y == tau is kept; tau = 0.1 as in its run script.)"""

    name = "profit"

    def __init__(self, tau: float = 0.1) -> None:
        super().__init__(tau=check_range("tau", tau, 0.0, 1.0, objective="profit"))

    def terms(self, x):
        keep = (x.p_y_detached >= self.params["tau"]).to(x.logp_y.dtype)
        return TokenTerms(loss=-keep * x.logp_y, gamma=keep)


class EAFT(Objective):
    """-sg(H_k / log k)^alpha log p_y, H_k the entropy of the renormalised top-k of p."""

    name = "eaft"

    def __init__(self, k: int = 20, alpha: float = 1.0) -> None:
        if int(k) < 2:
            raise ValueError(f"objective 'eaft': parameter `k` must be >= 2, got {k}")
        super().__init__(k=int(k), alpha=float(alpha))

    def terms(self, x):
        w = topk_entropy_ratio(x.logp.detach(), self.params["k"]).pow(self.params["alpha"])
        return TokenTerms(loss=-w * x.logp_y, gamma=w)


class TokenWeighted(Objective):
    """-w_t log p_y with per-token weights from the data."""

    name = "token_weighted"
    needs = frozenset({"token_weights"})

    def terms(self, x):
        w = x.require("token_weights").to(x.logp_y.dtype)
        return TokenTerms(loss=-w * x.logp_y, gamma=w)


class SFTKL(Objective):
    """-log p_y + lam * KL(pi_ref || p); gamma = 1/(1+lam), pi_tilde = pi_ref, c = 1 + lam."""

    name = "sft_kl"
    needs = frozenset({"ref"})

    def __init__(self, lam: float = 0.1) -> None:
        super().__init__(lam=check_range("lam", lam, 0.0, float("inf"), objective="sft_kl"))

    def terms(self, x):
        lam = self.params["lam"]
        kl = kl_to(x.ref_logp, x.logp)
        gamma = torch.full_like(x.p_y_detached, 1.0 / (1.0 + lam))
        return TokenTerms(loss=-x.logp_y + lam * kl, gamma=gamma)

    def implied_scale(self, x):
        return 1.0 + self.params["lam"]


class ASFT(Objective):
    """-sg(p_y) log p_y + lam * KL(pi_base || p); gamma = p_y/(p_y+lam), pi_tilde = pi_base, c = p_y + lam.
    The base (frozen initial) model reaches the engine as `ref_logits`."""

    name = "asft"
    needs = frozenset({"ref"})

    def __init__(self, lam: float = 0.05) -> None:
        super().__init__(lam=check_range("lam", lam, 0.0, float("inf"), objective="asft"))

    def terms(self, x):
        lam, p_y = self.params["lam"], x.p_y_detached
        kl = kl_to(x.ref_logp, x.logp)
        gamma = p_y / (p_y + lam) if lam > 0 else torch.ones_like(p_y)
        return TokenTerms(loss=-p_y * x.logp_y + lam * kl, gamma=gamma)

    def implied_scale(self, x):
        return x.p_y_detached + self.params["lam"]


class PSFT(Objective):
    """Proximal SFT: -min(r, clip(r, 1-eps, 1+eps)) with advantage 1, r = p_y / sg(pi_old(y)).
    With a positive advantage only the upper bound acts: tokens with r > 1+eps get no gradient,
    the others r (p - delta_y). The log-ratio is clamped to [-20, 20] before exp."""

    name = "psft"
    needs = frozenset({"old_logprobs"})

    def __init__(self, eps: float = 0.28) -> None:
        super().__init__(eps=check_range("eps", eps, 0.0, float("inf"), objective="psft"))

    def terms(self, x):
        upper = 1.0 + self.params["eps"]
        old = x.require("old_logprobs").to(x.logp_y.dtype).detach()
        ratio = torch.exp(torch.clamp(x.logp_y - old, -20.0, 20.0))
        clipped = ratio.detach() > upper
        surrogate = torch.where(clipped, torch.full_like(ratio, upper).detach(), ratio)
        gamma = torch.where(clipped, torch.zeros_like(ratio), ratio).detach()
        return TokenTerms(loss=-surrogate, gamma=gamma,
                          extras={"clip_frac": clipped.to(ratio.dtype), "ratio": ratio.detach()})


class GEM(Objective):
    """CE(delta_y, p) - CE(q, p), q ∝ sg(p)^(1/beta); gradient q - delta_y (a signed target)."""

    name = "gem"

    def __init__(self, beta: float = 0.7) -> None:
        if float(beta) <= 0:
            raise ValueError(f"objective 'gem': parameter `beta` must be > 0, got {beta}")
        super().__init__(beta=float(beta))

    def terms(self, x):
        log_q = torch.log_softmax(x.logp.detach() / self.params["beta"], dim=-1)
        loss = -x.logp_y - cross_entropy_to(log_q, x.logp)
        return TokenTerms(loss=loss, gamma=torch.ones_like(x.p_y_detached))


def kd(temperature: float = 1.0) -> TargetObjective:
    """-sum_v pi_T(v) log p_v, pi_T = softmax(teacher_logits / T); gamma = 0.

    Convention: only the teacher is softened; the student's p is not. The logit gradient is then
    p - pi_T at unit scale for every T, so no T^2 factor is applied (Hinton et al.'s T^2 compensates
    the 1/T that a softened *student* puts on the gradient, which this loss does not have)."""
    residual = TeacherResidual(temperature)
    return TargetObjective(ConstantGamma(0.0), residual, name="kd", temperature=residual.params["temperature"])


class DistillHybrid(Objective):
    """(1-lam)(-log p_y) + lam * KL(pi_T || p); gamma = 1-lam, pi_tilde = pi_T."""

    name = "distill_hybrid"
    needs = frozenset({"teacher"})

    def __init__(self, lam: float = 0.5, temperature: float = 1.0) -> None:
        lam = check_range("lam", lam, 0.0, 1.0, objective="distill_hybrid")
        super().__init__(lam=lam, temperature=float(temperature))
        self._teacher = TeacherResidual(temperature)

    def terms(self, x):
        lam = self.params["lam"]
        kl = kl_to(self._teacher.log_probs(x), x.logp)
        gamma = torch.full_like(x.p_y_detached, 1.0 - lam)
        return TokenTerms(loss=-(1.0 - lam) * x.logp_y + lam * kl, gamma=gamma)


def target_sft(eta: float = 0.5) -> TargetObjective:
    """CE(Q, p), Q = sg(p_y) delta_y + (1 - sg(p_y)) pi_tilde, pi_tilde ∝ sg(p)^(1-eta) pi_T^eta."""
    residual = GeometricMixResidual(eta)
    return TargetObjective(LabelProbGamma(), residual, name="target_sft", eta=residual.params["eta"])
