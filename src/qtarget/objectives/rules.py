"""The two choices that define a target Q = gamma * delta_y + (1 - gamma) * pi_tilde (SPEC §1-2).

Gamma rules map a chunk of positions to label trust `[n]` in (usually) [0, 1], detached.
Residual rules map it to log pi_tilde `[n, V]`, detached and normalised.
Each rule has `needs` (auxiliary inputs it reads) and `params` (for display and configs).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from qtarget.objectives.base import TokenInputs


class Rule:
    kind = "rule"
    name = "rule"
    needs: frozenset[str] = frozenset()

    def __init__(self, **params: float) -> None:
        self.params = params

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{self.name}({args})"


# ----------------------------------------------------------------------------- gamma rules
class GammaRule(Rule):
    kind = "gamma"
    reads_model = True  # reads p_y / p of a model (so its source can be chosen: gamma_from)

    def __call__(self, x: TokenInputs) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class ConstantGamma(GammaRule):
    """gamma = c."""

    name = "constant"
    reads_model = False

    def __init__(self, value: float = 1.0) -> None:
        super().__init__(value=float(value))

    def __call__(self, x):
        return torch.full_like(x.p_y_detached, self.params["value"])


class LabelProbGamma(GammaRule):
    """gamma = sg(p_y): the model's own support for the label (DFT, Target-SFT)."""

    name = "p_y"

    def __call__(self, x):
        return x.p_y_detached


class PowerGamma(GammaRule):
    """gamma = sg(p_y)^alpha (Beyond-log / prob loss)."""

    name = "power"

    def __init__(self, alpha: float = 1.0) -> None:
        super().__init__(alpha=float(alpha))

    def __call__(self, x):
        return x.p_y_detached.pow(self.params["alpha"])


class ThresholdGamma(GammaRule):
    """gamma = 1[sg(p_y) > tau] (ProFit)."""

    name = "threshold"

    def __init__(self, tau: float = 0.1) -> None:
        super().__init__(tau=float(tau))

    def __call__(self, x):
        return (x.p_y_detached > self.params["tau"]).to(x.p_y_detached.dtype)


def topk_entropy_ratio(logp: Tensor, k: int) -> Tensor:
    """[n] entropy of the renormalised top-k of p, divided by log k (in [0, 1])."""
    k = min(int(k), logp.shape[-1])
    top = torch.log_softmax(logp.topk(k, dim=-1).values, dim=-1)
    entropy = -(top.exp() * top).sum(-1)
    return (entropy / math.log(k)).clamp(0.0, 1.0) if k > 1 else torch.zeros_like(entropy)


def mass_at_or_below_label(logp: Tensor, labels: Tensor) -> Tensor:
    """[n] u = sum_v p_v 1[p_v < p_y] + p_y: the probability mass of the tokens no more likely than the
    label (the label's position in the cumulative distribution sorted by probability, PriFT-mass)."""
    p = logp.exp()
    p_y = p.gather(-1, labels.unsqueeze(-1))
    return (p * (p < p_y)).sum(-1) + p_y.squeeze(-1)


class MassGamma(GammaRule):
    """gamma = 1[u >= tau], u the mass of the tokens no more likely than the label (PriFT-mass; with
    gamma_from="reference" it is read from the frozen pretrained model, as in the paper)."""

    name = "mass"

    def __init__(self, tau: float = 0.5) -> None:
        if not 0.0 <= float(tau) <= 1.0:
            raise ValueError(f"gamma rule 'mass': `tau` must be in [0, 1], got {tau}")
        super().__init__(tau=float(tau))

    def __call__(self, x):
        u = mass_at_or_below_label(x.logp.detach(), x.labels)
        return (u >= self.params["tau"]).to(x.p_y_detached.dtype)


class TopKEntropyGamma(GammaRule):
    """gamma = (H_k / log k)^alpha, H_k the entropy of the renormalised top-k of sg(p) (EAFT)."""

    name = "topk_entropy"

    def __init__(self, k: int = 20, alpha: float = 1.0) -> None:
        if int(k) < 2:
            raise ValueError(f"gamma rule 'topk_entropy': `k` must be >= 2, got {k}")
        super().__init__(k=int(k), alpha=float(alpha))

    def __call__(self, x):
        return topk_entropy_ratio(x.logp.detach(), self.params["k"]).pow(self.params["alpha"])


class RatioGamma(GammaRule):
    """gamma = sg(p_y) / (sg(p_y) + lam) (ASFT's implied trust)."""

    name = "ratio"

    def __init__(self, lam: float = 0.1) -> None:
        super().__init__(lam=float(lam))

    def __call__(self, x):
        p_y = x.p_y_detached
        return p_y / (p_y + self.params["lam"])


def log_expm1(x: float) -> float:
    """log(e^x - 1) for x >= 0 without overflow (-inf at x = 0)."""
    return -math.inf if x == 0.0 else x + math.log(-math.expm1(-x))


class GibbsGamma(GammaRule):
    """gamma = (e^gain - 1) p_y / (1 + (e^gain - 1) p_y): the trust of Q ∝ pi_tilde * exp(gain * 1[v = y])
    written as gamma delta_y + (1 - gamma) pi_tilde when p_y is read from pi_tilde (GIFT: gamma_from=
    "reference" with the reference residual). Computed as sigmoid(log(e^gain - 1) + log p_y)."""

    name = "gibbs"

    def __init__(self, gain: float = 20.0) -> None:
        gain = float(gain)
        if not (math.isfinite(gain) and gain >= 0.0):
            raise ValueError(f"gamma rule 'gibbs': `gain` must be a finite number >= 0, got {gain}")
        super().__init__(gain=gain)

    def __call__(self, x):
        return torch.sigmoid(log_expm1(self.params["gain"]) + x.logp_y.detach())


class DataWeightGamma(GammaRule):
    """gamma = w_t, a per-token weight supplied with the data (e.g. critical-token masks)."""

    name = "data_weight"
    needs = frozenset({"token_weights"})
    reads_model = False

    def __call__(self, x):
        return x.require("token_weights").to(x.p_y_detached.dtype)


GAMMA_SOURCES = ("model", "reference")
GAMMA_SOURCE_ALIASES = {"student": "model", "online": "model", "ref": "reference", "base": "reference"}


class ReferenceSourcedGamma(GammaRule):
    """Any gamma rule evaluated on the frozen reference model instead of the online student: the rule
    reads p_y / p from `ref_logits` (PriFT: weights that do not drift with the run)."""

    name = "from_reference"

    def __init__(self, inner: GammaRule) -> None:
        if not inner.reads_model:
            raise ValueError(f"gamma rule {inner.name!r} reads no model probabilities: gamma_from='reference' "
                             f"does not apply to it")
        super().__init__(inner=inner)
        self.needs = frozenset(inner.needs | {"ref"})

    def __call__(self, x):
        return self.params["inner"](x.reference_view)

    def __repr__(self) -> str:
        return f"{self.params['inner']!r}@reference"


class ClampedGamma(GammaRule):
    """gamma = clamp(inner gamma, low, high): a floor / cap on any gamma rule (DFT's low-prior fix)."""

    name = "clamped"

    def __init__(self, inner: GammaRule, low: float | None = None, high: float | None = None) -> None:
        low = 0.0 if low is None else _unit("gamma_min", low)
        high = 1.0 if high is None else _unit("gamma_max", high)
        if low > high:
            raise ValueError(f"gamma_min ({low}) must not exceed gamma_max ({high})")
        super().__init__(inner=inner, low=low, high=high)
        self.needs = inner.needs
        self.reads_model = inner.reads_model

    def __call__(self, x):
        return self.params["inner"](x).clamp(self.params["low"], self.params["high"])

    def __repr__(self) -> str:
        return f"clamp({self.params['inner']!r}, {self.params['low']}, {self.params['high']})"


def _unit(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"`{name}` must be in [0, 1], got {value}")
    return value


def compose_gamma(rule: GammaRule, source: str = "model", low: float | None = None,
                  high: float | None = None) -> GammaRule:
    """`rule` read from `source` ("model": the online student; "reference": the frozen reference model),
    then clamped to [low, high] when either bound is given."""
    key = GAMMA_SOURCE_ALIASES.get(str(source), str(source))
    if key not in GAMMA_SOURCES:
        raise ValueError(f"gamma_from must be one of {', '.join(GAMMA_SOURCES)} (or {', '.join(GAMMA_SOURCE_ALIASES)}), "
                         f"got {source!r}")
    if key == "reference":
        rule = ReferenceSourcedGamma(rule)
    if low is not None or high is not None:
        rule = ClampedGamma(rule, low, high)
    return rule


# -------------------------------------------------------------------------- residual rules
class ResidualRule(Rule):
    kind = "residual"

    def log_probs(self, x: TokenInputs) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class UniformResidual(ResidualRule):
    name = "uniform"

    def log_probs(self, x):
        V = x.logits.shape[-1]
        return torch.full_like(x.logits, -math.log(V)).detach()


class StudentResidual(ResidualRule):
    """pi_tilde = sg(p): the remaining mass stays where the model already puts it."""

    name = "student"

    def log_probs(self, x):
        return x.logp.detach()


class TemperedResidual(ResidualRule):
    """pi_tilde ∝ sg(p)^(1/beta): beta < 1 sharpens, beta > 1 flattens."""

    name = "tempered"

    def __init__(self, beta: float = 0.5) -> None:
        if float(beta) <= 0:
            raise ValueError(f"residual rule 'tempered': `beta` must be > 0, got {beta}")
        super().__init__(beta=float(beta))

    def log_probs(self, x):
        return torch.log_softmax(x.logp.detach() / self.params["beta"], dim=-1)


class ReferenceResidual(ResidualRule):
    """pi_tilde = pi_ref, the frozen reference / base / old-policy model given as `ref_logits`."""

    name = "reference"
    needs = frozenset({"ref"})

    def log_probs(self, x):
        return x.ref_logp


class TeacherResidual(ResidualRule):
    """pi_tilde = softmax(teacher_logits / temperature)."""

    name = "teacher"
    needs = frozenset({"teacher"})

    def __init__(self, temperature: float = 1.0) -> None:
        if float(temperature) <= 0:
            raise ValueError(f"residual rule 'teacher': `temperature` must be > 0, got {temperature}")
        super().__init__(temperature=float(temperature))

    def log_probs(self, x):
        T = self.params["temperature"]
        return x.teacher_logp if T == 1.0 else torch.log_softmax(x.require("teacher") / T, dim=-1)


class GeometricMixResidual(ResidualRule):
    """pi_tilde ∝ sg(p)^(1-eta) * pi_T^eta (Target-SFT); eta=0 student, eta=1 teacher."""

    name = "geometric_mix"
    needs = frozenset({"teacher"})

    def __init__(self, eta: float = 0.5) -> None:
        if not 0.0 <= float(eta) <= 1.0:
            raise ValueError(f"residual rule 'geometric_mix': `eta` must be in [0, 1], got {eta}")
        super().__init__(eta=float(eta))
        if self.params["eta"] == 0.0:  # pi_tilde = sg(p): no teacher is read
            self.needs = frozenset()

    def log_probs(self, x):
        eta = self.params["eta"]
        if eta == 0.0:
            return x.logp.detach()
        mixed = (1.0 - eta) * x.logp.detach() + eta * x.teacher_logp
        return torch.log_softmax(mixed, dim=-1)


class TopKResidual(ResidualRule):
    """Any residual truncated to its own top-k entries and renormalised."""

    name = "topk"

    def __init__(self, inner: ResidualRule, k: int = 20) -> None:
        if int(k) < 1:
            raise ValueError(f"residual rule 'topk': `k` must be >= 1, got {k}")
        super().__init__(inner=inner, k=int(k))
        self.needs = inner.needs

    def log_probs(self, x):
        logq = self.params["inner"].log_probs(x)
        k = min(self.params["k"], logq.shape[-1])
        top = logq.topk(k, dim=-1)
        out = torch.full_like(logq, -math.inf)
        return out.scatter(-1, top.indices, torch.log_softmax(top.values, dim=-1))


GAMMA_RULES: dict[str, type[GammaRule]] = {
    cls.name: cls
    for cls in (ConstantGamma, LabelProbGamma, PowerGamma, ThresholdGamma, TopKEntropyGamma, RatioGamma, DataWeightGamma,
                MassGamma, GibbsGamma)
}
RESIDUAL_RULES: dict[str, type[ResidualRule]] = {
    cls.name: cls
    for cls in (UniformResidual, StudentResidual, TemperedResidual, ReferenceResidual, TeacherResidual, GeometricMixResidual)
}
# Other names people use for the same residuals: the base model (ASFT) reaches the engine as
# `ref_logits`; "sharpened" is the tempered rule with beta < 1.
RESIDUAL_ALIASES = {"ref": "reference", "base": "reference", "sg_p": "student",
                    "sharpened": "tempered", "geometric": "geometric_mix", "mix": "geometric_mix"}
# Names that look like residuals but have no exact implementation; asking for one is an error that says why.
UNAVAILABLE_RESIDUALS = {
    "old": "a pi_old residual needs the full distribution of the model at PSFT's last refresh at every token "
           "(a second copy of the model or [tokens x vocab] storage), which qtarget does not keep; PSFT itself "
           "needs only log pi_old(y) (objective 'psft'). For a frozen-model residual use 'reference' with a "
           "ref_model (the frozen initial model by default)",
}
GAMMA_ALIASES = {"label_prob": "p_y", "prob": "p_y", "entropy": "topk_entropy", "weight": "data_weight"}
