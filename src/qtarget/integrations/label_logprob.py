"""Objectives from the label's log-probability alone.

Trainers such as verl hand a loss only log p(y) per token, not the logits. An objective whose per-token
loss reads nothing but log p(y) (and per-token data such as log pi_old(y) or weights) is exact there:
sft, dft, prob, profit, psft, token_weighted, nll_masked, prob_masked, ... This module runs any
registered objective's own `terms` on such inputs, and says which objectives need more: one that reads
the distribution p (or the logits) raises `NeedsDistributionError`, one that needs a teacher or a
reference model is refused before it runs.
"""
from __future__ import annotations

from functools import cached_property

import torch
from torch import Tensor

from qtarget.objectives.base import AUX_ARGUMENTS, Objective, TokenInputs, TokenTerms

# what each auxiliary input of an objective would have to be, per supervised token, in a trainer that
# passes only log p(y)
DISTRIBUTION_NEEDS = {
    "teacher": "the teacher's logits (or its top-k log-probs) at every supervised token",
    "ref": "the frozen reference model's logits at every supervised token",
}
LABEL_ONLY_AUX = ("old_logprobs", "token_weights")


class NeedsDistributionError(ValueError):
    """The objective reads the model's distribution p (or its logits), which a log p(y)-only trainer
    does not pass."""


class LabelLogProbInputs(TokenInputs):
    """TokenInputs that know log p(y) [n] but not the logits: `logp_y` is given (its gradient flows to
    the trainer's log-probs), `p_y_detached` follows from it, and reading `logits` or `logp` raises."""

    def __init__(self, logp_y: Tensor, labels: Tensor | None = None, *, old_logprobs: Tensor | None = None,
                 token_weights: Tensor | None = None, objective_name: str = "objective") -> None:
        self._objective_name = objective_name
        labels = torch.zeros(logp_y.shape, dtype=torch.long, device=logp_y.device) if labels is None else labels
        super().__init__(logits=None, labels=labels, old_logprobs=old_logprobs, token_weights=token_weights)
        self.__dict__["logp_y"] = logp_y

    @property
    def logits(self) -> Tensor:
        raise NeedsDistributionError(
            f"objective {self._objective_name!r} reads the model's logits, not only log p(y): it needs the full "
            f"distribution at every supervised token")

    @logits.setter
    def logits(self, value: Tensor | None) -> None:  # the dataclass __init__ assigns it; nothing is kept
        pass

    @cached_property
    def logp(self) -> Tensor:
        raise NeedsDistributionError(
            f"objective {self._objective_name!r} reads the model's distribution p (log-softmax of the logits), "
            f"not only log p(y): it needs the full distribution at every supervised token")


def check_label_only(objective: Objective) -> None:
    """Raise a ValueError naming what is missing unless `objective` is computable from log p(y) (plus
    per-token old log-probs / weights). Tried on two dummy tokens, so a registered custom objective is
    judged by what its own `terms` reads."""
    needs_model = sorted(set(objective.needs) - set(LABEL_ONLY_AUX))
    if needs_model:
        what = "; ".join(f"`{AUX_ARGUMENTS[n]}`: {DISTRIBUTION_NEEDS.get(n, n)}" for n in needs_model)
        raise NeedsDistributionError(f"objective {objective.name!r} needs {what}, which a trainer that passes only "
                                     f"log p(y) does not have")
    logp_y = torch.log(torch.tensor([0.3, 0.6], dtype=torch.float64))
    aux = {AUX_ARGUMENTS[n]: torch.tensor([-1.0, -0.5], dtype=torch.float64) if n == "old_logprobs"
           else torch.ones(2, dtype=torch.float64) for n in objective.needs}
    objective.terms(LabelLogProbInputs(logp_y, objective_name=objective.name, **aux))


def label_terms(objective: Objective, logp_y: Tensor, *, old_logprobs: Tensor | None = None,
                token_weights: Tensor | None = None) -> TokenTerms:
    """The objective's per-token terms [n] from log p(y) [n] of the supervised tokens (and, where it needs
    them, old_logprobs / token_weights [n], detached)."""
    for need in objective.needs:
        arg = AUX_ARGUMENTS[need]
        if need in LABEL_ONLY_AUX and {"old_logprobs": old_logprobs, "token_weights": token_weights}[arg] is None:
            raise ValueError(f"objective {objective.name!r} needs `{arg}` per supervised token, which was not given")
    x = LabelLogProbInputs(logp_y, objective_name=objective.name,
                           old_logprobs=None if old_logprobs is None else old_logprobs.detach().to(logp_y.dtype),
                           token_weights=None if token_weights is None else token_weights.detach().to(logp_y.dtype))
    return objective.terms(x)
