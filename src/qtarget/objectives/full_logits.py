"""The full-logits path: an objective on materialised logits. Every faster path is tested against it."""
from __future__ import annotations

import torch
from torch import Tensor

from qtarget.objectives.base import Objective
from qtarget.objectives.metrics import MetricSums, token_metrics
from qtarget.objectives.registry import get_objective
from qtarget.objectives.supervised import (
    LossResult,
    apply_loss_weights,
    check_finite as assert_finite,
    reduction_weights,
    supervised_rows,
)


def token_loss(
    objective: str | Objective,
    logits: Tensor,
    labels: Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    normalizer: float | Tensor | None = None,
    ref_logits: Tensor | None = None,
    teacher_logits: Tensor | None = None,
    old_logprobs: Tensor | None = None,
    token_weights: Tensor | None = None,
    loss_weights: Tensor | None = None,
    check_finite: bool = True,
) -> LossResult:
    """Loss of `objective` on aligned `logits [..., V]` and `labels [...]` (no shift inside).

    Computed in float32 whatever the input dtype. Only supervised positions (label != ignore_index)
    are evaluated. `reduction`: "mean" over supervised tokens, "sum", or "sequence_mean" (labels
    [B, T]); `normalizer` divides the sum instead (global-batch normalisation, as transformers'
    `num_items_in_batch`). `ref_logits`/`teacher_logits` [..., V] and `old_logprobs`/`token_weights`
    [...] are detached auxiliary inputs the objective may need. `loss_weights` [...] multiplies each
    position's loss in the reduction, whatever the objective (data-side weights such as
    `--prompt_loss_weight`); the normaliser is unchanged.
    """
    objective = get_objective(objective)
    if logits.dim() < 1 or tuple(logits.shape[:-1]) != tuple(labels.shape):
        raise ValueError(f"logits shape {tuple(logits.shape)} does not match labels shape "
                         f"{tuple(labels.shape)}: expected logits [..., V] with [...] == labels' shape")
    V = logits.shape[-1]
    aux = {"teacher_logits": teacher_logits, "ref_logits": ref_logits,
           "old_logprobs": old_logprobs, "token_weights": token_weights}
    sup = supervised_rows(objective, labels, V, aux, ignore_index=ignore_index)
    if check_finite:
        assert_finite("logits", logits)
    x = sup.token_inputs(logits.reshape(-1, V)[sup.flat].to(torch.float32), aux)
    for name in ("teacher_logits", "ref_logits"):  # at the supervised rows only
        if check_finite and getattr(x, name) is not None:
            assert_finite(name, getattr(x, name), allow_neg_inf=True)
    terms = objective.terms(x)
    weights = reduction_weights(sup.mask, reduction, normalizer).reshape(-1)[sup.flat]
    weights = apply_loss_weights(weights, loss_weights, sup)
    loss = (terms.loss * weights).sum()
    per_token = torch.zeros(sup.flat.shape, dtype=terms.loss.dtype, device=logits.device)
    per_token = per_token.masked_scatter(sup.flat, terms.loss).reshape(sup.positions)
    sums = MetricSums()
    sums.add(token_metrics(x, terms, objective.teacher_temperature))
    return LossResult(loss=loss, per_token=per_token, metrics=sums.means())


