"""Layer 1: the math. Objectives as (gamma rule, residual rule) and the named catalogue, the
reference full-logits loss and the registry. Pure functions of tensors."""
from qtarget.objectives.base import Objective, TokenInputs, TokenTerms
from qtarget.objectives.batching import LossResult
from qtarget.objectives.catalog import TargetObjective
from qtarget.objectives.reference import token_loss
from qtarget.objectives.registry import get_objective, list_objectives, objective_parameters, register_objective, target

__all__ = ["Objective", "TokenInputs", "TokenTerms", "TargetObjective", "LossResult", "token_loss",
           "get_objective", "list_objectives", "objective_parameters", "register_objective", "target"]
