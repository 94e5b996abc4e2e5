"""The reference loss path: an objective on full logits. Every faster path is tested against it."""
from __future__ import annotations

import torch
from torch import Tensor

from qtarget.objectives.base import Objective, TokenInputs
from qtarget.objectives.batching import (
    LossResult,
    MetricSums,
    check_aux,
    check_finite as assert_finite,
    check_labels,
    reduction_weights,
    token_metrics,
)
from qtarget.objectives.registry import get_objective


def _select(value: Tensor | None, flat_mask: Tensor, tail: tuple[int, ...] = ()) -> Tensor | None:
    if value is None:
        return None
    return value.reshape((-1,) + tail)[flat_mask].to(torch.float32)


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
    check_finite: bool = True,
) -> LossResult:
    """Loss of `objective` on aligned `logits [..., V]` and `labels [...]` (no shift inside).

    Computed in float32 whatever the input dtype. Only supervised positions (label != ignore_index)
    are evaluated. `reduction`: "mean" over supervised tokens, "sum", or "sequence_mean" (labels
    [B, T]); `normalizer` divides the sum instead (global-batch normalisation, as transformers'
    `num_items_in_batch`). `ref_logits`/`teacher_logits` [..., V] and `old_logprobs`/`token_weights`
    [...] are detached auxiliary inputs the objective may need.
    """
    objective = get_objective(objective)
    if logits.dim() < 1 or tuple(logits.shape[:-1]) != tuple(labels.shape):
        raise ValueError(f"logits shape {tuple(logits.shape)} does not match labels shape "
                         f"{tuple(labels.shape)}: expected logits [..., V] with [...] == labels' shape")
    V = logits.shape[-1]
    positions = tuple(labels.shape)
    aux = {"teacher_logits": teacher_logits, "ref_logits": ref_logits,
           "old_logprobs": old_logprobs, "token_weights": token_weights}
    check_aux(objective, aux, positions, V)
    mask = check_labels(labels, V, ignore_index)
    if check_finite:
        assert_finite("logits", logits)
    flat = mask.reshape(-1)
    x = TokenInputs(
        logits=logits.reshape(-1, V)[flat].to(torch.float32),
        labels=labels.reshape(-1)[flat].long(),
        teacher_logits=_select(teacher_logits, flat, (V,)) if teacher_logits is not None else None,
        ref_logits=_select(ref_logits, flat, (V,)) if ref_logits is not None else None,
        old_logprobs=_select(old_logprobs, flat),
        token_weights=_select(token_weights, flat),
    )
    for name in ("teacher_logits", "ref_logits"):
        if check_finite and getattr(x, name) is not None:
            assert_finite(name, getattr(x, name), allow_neg_inf=True)
    x.teacher_logits = None if x.teacher_logits is None else x.teacher_logits.detach()
    x.ref_logits = None if x.ref_logits is None else x.ref_logits.detach()
    terms = objective.terms(x)
    weights = reduction_weights(mask, reduction, normalizer).reshape(-1)[flat]
    loss = (terms.loss * weights).sum()
    per_token = torch.zeros(flat.shape, dtype=terms.loss.dtype, device=logits.device)
    per_token = per_token.masked_scatter(flat, terms.loss).reshape(positions)
    sums = MetricSums()
    sums.add(token_metrics(x, terms, objective.teacher_temperature))
    return LossResult(loss=loss, per_token=per_token, metrics=sums.means())


