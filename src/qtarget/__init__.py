"""qtarget: fine-tune language models toward designed target distributions.

Every token-level objective pushes the model toward a target Q = gamma * delta_y + (1 - gamma) * pi_tilde.
The public API:

    list_objectives() / get_objective(name, **params) / target(gamma=..., residual=...)
    register_objective(name, factory)
    token_loss(objective, logits, labels, ...)          reference path on full logits
    fused_token_loss(objective, hidden, lm_head_weight, labels, ...)   chunked, no [N, V] logits
    implied_target(objective, logits, labels, ...)      Q (and c) from any loss, by autograd
    patch(model, objective, teacher=..., ref=...)       the model's forward returns the fused loss
                                                        (drop-in for TRL's SFTTrainer, HF Trainer, plain loops)
    check_answer(response, gold)                        reasoning-answer equivalence
"""
from __future__ import annotations

from qtarget.analysis import implied_target
from qtarget.objectives import (
    LossResult,
    Objective,
    TargetObjective,
    TokenInputs,
    TokenTerms,
    get_objective,
    list_objectives,
    objective_parameters,
    register_objective,
    target,
    token_loss,
)

__version__ = "0.1.0"

__all__ = [
    "__version__", "LossResult", "Objective", "TargetObjective", "TokenInputs", "TokenTerms",
    "get_objective", "list_objectives", "objective_parameters", "register_objective", "target",
    "token_loss", "implied_target", "fused_token_loss", "patch", "check_answer",
]


def __getattr__(name: str):
    # Heavier layers load on first use so `import qtarget` stays cheap.
    if name == "fused_token_loss":
        from qtarget.ops import fused_token_loss

        return fused_token_loss
    if name == "patch":
        from qtarget.training.patch import patch

        return patch
    if name == "check_answer":
        from qtarget.evaluation.answers import check_answer

        return check_answer
    raise AttributeError(f"module 'qtarget' has no attribute {name!r}")
