"""The objective contract: what one token-level objective computes from one batch of positions.

Every objective sees only *supervised* positions, flattened to `n` rows:

    TokenInputs.logits         [n, V] float32, student logits (gradient flows)
    TokenInputs.labels         [n]    int64 in [0, V)
    TokenInputs.teacher_logits [n, V] float32, detached (or None)
    TokenInputs.ref_logits     [n, V] float32, detached: reference / base / old-policy model (or None)
    TokenInputs.old_logprobs   [n]    float32, log pi_old(y), detached (or None)
    TokenInputs.token_weights  [n]    float32 per-token data weights (or None)

and returns `TokenTerms`: the per-token loss `[n]` (differentiable) and the label trust gamma `[n]`
(detached, for metrics). The reference path and the fused chunked engine call the same `terms`, so
an objective is written once and is exact on both.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import Tensor

AUX_ARGUMENTS = {
    "teacher": "teacher_logits",
    "ref": "ref_logits",
    "old_logprobs": "old_logprobs",
    "token_weights": "token_weights",
}


@dataclass(eq=False)
class TokenInputs:
    logits: Tensor
    labels: Tensor
    teacher_logits: Tensor | None = None
    ref_logits: Tensor | None = None
    old_logprobs: Tensor | None = None
    token_weights: Tensor | None = None

    # Derived quantities, computed once per chunk and shared by the objective and the metrics.
    @cached_property
    def logp(self) -> Tensor:
        """[n, V] log-softmax of the student (differentiable)."""
        return torch.log_softmax(self.logits, dim=-1)

    @cached_property
    def logp_y(self) -> Tensor:
        """[n] log p(y) (differentiable)."""
        return self.logp.gather(-1, self.labels.unsqueeze(-1)).squeeze(-1)

    @cached_property
    def p_detached(self) -> Tensor:
        """[n, V] sg(p)."""
        return self.logp.detach().exp()

    @cached_property
    def p_y_detached(self) -> Tensor:
        """[n] sg(p_y)."""
        return self.logp_y.detach().exp()

    @cached_property
    def teacher_logp(self) -> Tensor:
        return torch.log_softmax(self.require("teacher"), dim=-1)

    @cached_property
    def ref_logp(self) -> Tensor:
        return torch.log_softmax(self.require("ref"), dim=-1)

    @cached_property
    def reference_view(self) -> TokenInputs:
        """The same positions seen through the frozen reference model: its logits take the place of the
        student's (detached), so any gamma rule can read p_y / p from the reference (gamma_from="reference")."""
        view = TokenInputs(logits=self.require("ref").detach(), labels=self.labels,
                           teacher_logits=self.teacher_logits, ref_logits=self.ref_logits,
                           old_logprobs=self.old_logprobs, token_weights=self.token_weights)
        view.__dict__["logp"] = self.ref_logp.detach()  # shared with a reference residual, computed once
        return view

    def require(self, need: str) -> Tensor:
        value = getattr(self, AUX_ARGUMENTS[need])
        if value is None:
            raise ValueError(f"this objective needs `{AUX_ARGUMENTS[need]}`, which was not given")
        return value


@dataclass
class TokenTerms:
    """Per-token output of an objective: `loss` [n] (differentiable), `gamma` [n] (detached) and
    optional per-token metric values (detached, averaged over supervised tokens by the engine)."""

    loss: Tensor
    gamma: Tensor
    extras: dict[str, Tensor] = field(default_factory=dict)


def cross_entropy_to(log_target: Tensor, logp: Tensor) -> Tensor:
    """[n] CE(Q, p) = -sum_v Q_v log p_v for a detached target given as log-probabilities."""
    return -(log_target.exp() * logp).sum(-1)


def kl_to(log_target: Tensor, logp: Tensor) -> Tensor:
    """[n] KL(Q || p) = sum_v Q_v (log Q_v - log p_v); zero-probability entries contribute 0."""
    q = log_target.exp()
    return (q * (log_target - logp)).where(q > 0, 0.0).sum(-1)


class Objective:
    """Base class. Subclasses set `name`, `needs` (subset of AUX_ARGUMENTS keys) and implement
    `terms`. `implied_scale` is the c in  dL/dz = c * (p - Q)  (default 1, SPEC §1)."""

    name: str = "custom"
    needs: frozenset[str] = frozenset()

    def __init__(self, **params: float) -> None:
        self.params = dict(params)

    def terms(self, x: TokenInputs) -> TokenTerms:  # pragma: no cover - abstract
        raise NotImplementedError

    def implied_scale(self, x: TokenInputs) -> Tensor | float:
        return 1.0

    @property
    def teacher_temperature(self) -> float:
        """T of the teacher distribution this objective reads, softmax(teacher_logits / T); the
        kl_teacher metric is measured against that distribution."""
        return float(self.params.get("temperature", 1.0))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{self.name}({args})"


def check_range(name: str, value: float, low: float, high: float, *, objective: str) -> float:
    value = float(value)
    if not (low <= value <= high):
        raise ValueError(f"objective {objective!r}: parameter `{name}` must be in [{low}, {high}], got {value}")
    return value
