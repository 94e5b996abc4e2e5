"""qtarget: fine-tune language models toward designed target distributions.

Every token-level objective pushes the model toward a target Q = gamma * delta_y + (1 - gamma) * pi_tilde.
The public API:

    list_objectives() / get_objective(name, **params) / target(gamma=..., residual=...)
    register_objective(name, factory)
    token_loss(objective, logits, labels, ...)          the full-logits path
    fused_token_loss(objective, hidden, lm_head, labels, ...)   chunked, no [N, V] logits
    implied_target(objective, logits, labels, ...)      Q (and c) from any loss, by autograd
    patch(model, objective, teacher=..., ref=...)       the model's forward returns the fused loss
                                                        (drop-in for TRL's SFTTrainer, HF Trainer, plain loops)
    check_answer(response, gold)                        reasoning-answer equivalence

`pip install qtarget` is the torch-only core (torch, numpy, safetensors): everything above but `patch`
and `check_answer`. Extras (qtarget.extras): patch (transformers), hf (the trainer and the CLI), plots,
eval, lab, all; a name or command that needs a missing one says which, in one line.
"""
from __future__ import annotations

from qtarget.lazy import lazy_attributes

__version__ = "0.1.0"

# Public name -> module. Loaded on first use: `import qtarget` (and so `qtarget --help`) does not
# import torch or transformers. Measured on the project machine: `qtarget --help` 4.0-4.7 s when
# this package imported its objectives eagerly (torch), about 0.1 s now.
_PUBLIC = {
    "LossResult": "qtarget.objectives", "Objective": "qtarget.objectives", "TargetObjective": "qtarget.objectives",
    "TokenInputs": "qtarget.objectives", "TokenTerms": "qtarget.objectives", "get_objective": "qtarget.objectives",
    "list_objectives": "qtarget.objectives", "objective_parameters": "qtarget.objectives",
    "register_objective": "qtarget.objectives", "target": "qtarget.objectives", "token_loss": "qtarget.objectives",
    "implied_target": "qtarget.analysis", "fused_token_loss": "qtarget.ops", "patch": "qtarget.training.patch",
    "check_answer": "qtarget.evaluation.answers",
}
__all__ = ["__version__", *_PUBLIC]


# what the names outside the torch-only core need (qtarget.extras)
_EXTRAS = {"patch": "patch", "check_answer": "eval"}
__getattr__ = lazy_attributes(__name__, _PUBLIC, _EXTRAS)


def __dir__() -> list[str]:
    return sorted(__all__)
