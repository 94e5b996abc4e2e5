"""Use qtarget objectives inside other training libraries.

TRL: `SFTTrainer(..., compute_loss_func=trl_loss("dft"))`. TRL calls the function with the model's
outputs (full logits [B, T, V]), the *unshifted* labels [B, T] and `num_items_in_batch` (supervised
tokens of the whole accumulated batch, over ranks); the function shifts, evaluates the objective on
the reference path and divides the token sum by `num_items_in_batch` (token mean when it is None).
Objectives that need a teacher, reference or old log-probs cannot get them through this hook and are
refused; use `qtarget.training.QTargetTrainer` for those.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from qtarget.objectives import Objective, get_objective, token_loss


def trl_loss(objective: str | Objective, *, ignore_index: int = -100, **params: Any) -> Callable[..., torch.Tensor]:
    """A `compute_loss_func(outputs, labels, num_items_in_batch=None) -> loss` for TRL / transformers.

    Per-token data weights (`token_weighted`) are not available through this hook either."""
    obj = get_objective(objective, **params)
    if obj.needs:
        raise ValueError(f"objective {obj.name!r} needs {sorted(obj.needs)}, which TRL's compute_loss_func "
                         f"cannot provide; use qtarget.training.QTargetTrainer")

    def compute_loss_func(outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
        if labels is None:
            raise ValueError("trl_loss: the batch has no labels")
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs.logits
        logits = logits[:, :-1]
        shifted = labels[:, 1:].to(logits.device)
        normalizer = None
        if num_items_in_batch is not None:
            normalizer = torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=logits.device).clamp_min(1.0)
        return token_loss(obj, logits, shifted, ignore_index=ignore_index, normalizer=normalizer).loss

    compute_loss_func.objective = obj  # type: ignore[attr-defined]
    return compute_loss_func
