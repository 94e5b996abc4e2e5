"""What every loss path shares around the objective: input checks, supervised-token selection,
reduction weights and metric accumulation. Used by the reference path and the fused engine."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from qtarget.objectives.base import AUX_ARGUMENTS, Objective, TokenInputs, TokenTerms, kl_to

REDUCTIONS = ("mean", "sum", "sequence_mean")


@dataclass
class LossResult:
    """`loss` scalar; `per_token` [labels.shape] float32, 0 where ignored (detached in the fused
    path); `metrics` floats averaged over supervised tokens (nll, p_y, entropy, gamma, ...)."""

    loss: Tensor
    per_token: Tensor
    metrics: dict[str, float] = field(default_factory=dict)


def check_labels(labels: Tensor, vocab_size: int, ignore_index: int) -> Tensor:
    """Boolean mask of supervised positions; raises on ids outside [0, V) that are not ignored."""
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    mask = labels != ignore_index
    bad = mask & ((labels < 0) | (labels >= vocab_size))
    if bool(bad.any()):
        where = bad.nonzero()[0].tolist()
        value = int(labels[tuple(where)])
        raise ValueError(f"labels contain {value} at position {tuple(where)}: expected ignore_index "
                         f"({ignore_index}) or a token id in [0, {vocab_size})")
    return mask


def check_finite(name: str, tensor: Tensor, *, allow_neg_inf: bool = False) -> None:
    """NaN / inf values are an error; with `allow_neg_inf` (teacher / reference logits), -inf is a
    token of probability 0, allowed as long as a row keeps a finite entry."""
    if allow_neg_inf:
        bad = torch.isnan(tensor) | (tensor == float("inf"))
        if not bool(bad.any()) and bool(torch.isfinite(tensor).any(-1).all()):
            return
        if not bool(bad.any()):
            raise ValueError(f"`{name}` has a row that is -inf everywhere (no token with positive probability)")
        raise ValueError(f"`{name}` contains {int(bad.sum())} NaN or +inf value(s) (pass check_finite=False to skip "
                         f"this check)")
    if not bool(torch.isfinite(tensor).all()):
        n_bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(f"`{name}` contains {n_bad} NaN or inf value(s) (pass check_finite=False to skip this check)")


def check_aux(objective: Objective, given: dict[str, Tensor | None], positions: tuple[int, ...],
              vocab_size: int) -> None:
    """Every auxiliary input the objective needs is present and shaped like the positions."""
    for need in sorted(objective.needs):
        arg = AUX_ARGUMENTS[need]
        if given.get(arg) is None:
            raise ValueError(f"objective {objective.name!r} needs `{arg}`, which was not given")
    for arg, value in given.items():
        if value is None:
            continue
        if arg in ("teacher_logits", "ref_logits"):
            if value.shape[-1] != vocab_size:
                raise ValueError(f"`{arg}` has vocabulary size {value.shape[-1]} but the student has "
                                 f"{vocab_size}: the {arg.split('_')[0]} model must share the student's vocabulary")
            if tuple(value.shape[:-1]) != positions:
                raise ValueError(f"`{arg}` has shape {tuple(value.shape)}, expected {positions + (vocab_size,)}")
        elif tuple(value.shape) != positions:
            raise ValueError(f"`{arg}` has shape {tuple(value.shape)}, expected the labels' shape {positions}")


def reduction_weights(mask: Tensor, reduction: str, normalizer: float | Tensor | None) -> Tensor:
    """Per-position weights [labels.shape] so that loss = sum(per_token * weights).
    `normalizer` (e.g. the global batch's supervised-token count) overrides `reduction`."""
    w = mask.to(torch.float32)
    if normalizer is not None:
        return w / torch.as_tensor(normalizer, dtype=torch.float32, device=w.device)
    if reduction == "sum":
        return w
    if reduction == "mean":
        return w / w.sum().clamp_min(1.0)
    if reduction == "sequence_mean":
        if mask.dim() < 2:
            raise ValueError(f"reduction='sequence_mean' needs labels shaped [batch, time], got {tuple(mask.shape)}")
        per_seq = w.sum(-1, keepdim=True)
        n_seqs = (per_seq > 0).sum().clamp_min(1)
        return w / per_seq.clamp_min(1.0) / n_seqs
    raise ValueError(f"unknown reduction {reduction!r}; valid: {', '.join(REDUCTIONS)} (or pass normalizer=)")


def token_metrics(x: TokenInputs, terms: TokenTerms, teacher_temperature: float = 1.0) -> dict[str, Tensor]:
    """Per-token metric values [n] (detached) for one chunk of supervised positions. kl_teacher is
    KL(pi_T || p) with pi_T = softmax(teacher_logits / teacher_temperature), the objective's pi_T."""
    with torch.no_grad():
        logp = x.logp.detach()
        out = {
            "nll": -x.logp_y.detach(),
            "p_y": x.p_y_detached,
            "entropy": -(logp.exp() * logp).sum(-1),
            "gamma": terms.gamma.detach().to(torch.float32),
            "top1": (logp.argmax(-1) == x.labels).to(torch.float32),
        }
        if x.ref_logits is not None:
            out["kl_ref"] = kl_to(x.ref_logp, logp)
        if x.teacher_logits is not None:
            teacher_logp = x.teacher_logp if teacher_temperature == 1.0 else \
                torch.log_softmax(x.teacher_logits / teacher_temperature, dim=-1)
            out["kl_teacher"] = kl_to(teacher_logp, logp)
        for key, value in terms.extras.items():
            out[key] = value.detach().to(torch.float32)
    return out


class MetricSums:
    """Running sums of per-token metrics over chunks; `means()` divides by the token count."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.count = 0

    def add(self, values: dict[str, Tensor]) -> None:
        for key, value in values.items():
            s = value.sum()
            self.sums[key] = self.sums[key] + s if key in self.sums else s
        if values:
            self.count += next(iter(values.values())).numel()

    def means(self) -> dict[str, float]:
        out = {k: float(v) / max(self.count, 1) for k, v in self.sums.items()}
        for key in ("nll", "p_y", "entropy", "gamma"):
            out.setdefault(key, 0.0)
        out["n_tokens"] = float(self.count)
        return out
