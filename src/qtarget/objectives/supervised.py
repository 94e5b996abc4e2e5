"""What every loss path shares around the objective: the checks of labels and auxiliary inputs, the
selection of supervised rows and reduction weights. Used by the full-logits
path (`token_loss`), the fused engine and `implied_target`, so each is written once."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from qtarget.objectives.base import AUX_ARGUMENTS, Objective, TokenInputs

REDUCTIONS = ("mean", "sum", "sequence_mean")
AUX_INPUTS = tuple(AUX_ARGUMENTS.values())  # teacher_logits, ref_logits, old_logprobs, token_weights


@dataclass
class LossResult:
    """`loss` scalar; `per_token` [labels.shape] float32, 0 where ignored (detached in the fused
    path); `metrics` floats averaged over supervised tokens (nll, p_y, entropy, gamma, ...)."""

    loss: Tensor
    per_token: Tensor
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(eq=False)
class SupervisedRows:
    """The supervised positions of one call (label != ignore_index), after every input was checked.

    positions: the labels' shape [...]; flat [N] bool over the flattened positions; labels [n] int64."""

    positions: tuple[int, ...]
    flat: Tensor
    labels: Tensor

    @property
    def mask(self) -> Tensor:
        return self.flat.reshape(self.positions)

    @property
    def rows(self) -> Tensor:
        """[n] int64 indices of the supervised positions in [0, N)."""
        return self.flat.nonzero().squeeze(-1)

    def pick(self, value: Tensor | None, tail: tuple[int, ...] = ()) -> Tensor | None:
        """[n, *tail] float32, detached: `value` [..., *tail] at the supervised positions."""
        return None if value is None else value.detach().reshape((-1,) + tail)[self.flat].to(torch.float32)

    def token_inputs(self, logits: Tensor, aux: dict[str, Tensor | None]) -> TokenInputs:
        """TokenInputs for the supervised rows: `logits` [n, V] already selected (it may carry a
        gradient), auxiliary inputs [..., V] / [...] selected here (detached)."""
        V = logits.shape[-1]
        return TokenInputs(logits=logits, labels=self.labels,
                           teacher_logits=self.pick(aux.get("teacher_logits"), (V,)),
                           ref_logits=self.pick(aux.get("ref_logits"), (V,)),
                           old_logprobs=self.pick(aux.get("old_logprobs")),
                           token_weights=self.pick(aux.get("token_weights")))


def supervised_rows(objective: Objective, labels: Tensor, vocab_size: int, aux: dict[str, Tensor | None], *,
                    ignore_index: int = -100) -> SupervisedRows:
    """Check `labels` [...] and the auxiliary inputs `aux` (names: AUX_INPUTS) for `objective` over a
    vocabulary of `vocab_size`, and select the supervised rows. Errors name the argument and position."""
    if not isinstance(labels, Tensor):
        raise ValueError(f"labels must be a tensor, got {type(labels).__name__}")
    unknown = set(aux) - set(AUX_INPUTS)
    if unknown:
        raise ValueError(f"unknown auxiliary argument(s) {sorted(unknown)}; valid: {', '.join(AUX_INPUTS)}")
    positions = tuple(labels.shape)
    check_aux(objective, aux, positions, vocab_size)
    flat = check_labels(labels, vocab_size, ignore_index).reshape(-1)
    return SupervisedRows(positions=positions, flat=flat, labels=labels.reshape(-1)[flat].long())


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


def apply_loss_weights(weights: Tensor, loss_weights: Tensor | None, sup: SupervisedRows) -> Tensor:
    """`weights` [n] of the supervised rows times `loss_weights` [labels.shape] (per-position data weights,
    e.g. prompt tokens at `--prompt_loss_weight`) at those rows; `weights` as is without them."""
    if loss_weights is None:
        return weights
    if not isinstance(loss_weights, Tensor) or tuple(loss_weights.shape) != sup.positions:
        shape = tuple(loss_weights.shape) if isinstance(loss_weights, Tensor) else type(loss_weights).__name__
        raise ValueError(f"`loss_weights` has shape {shape}, expected the labels' shape {sup.positions}")
    return weights * sup.pick(loss_weights).to(weights.device, weights.dtype)


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
