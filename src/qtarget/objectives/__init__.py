"""Layer 1: the math. Objectives as (gamma rule, residual rule) and the named catalogue, the
full-logits loss path and the registry. Pure functions of tensors."""
from qtarget.objectives.base import Objective, TokenInputs, TokenTerms
from qtarget.objectives.supervised import LossResult
from qtarget.objectives.catalog import TargetObjective
from qtarget.objectives.full_logits import token_loss
from qtarget.objectives.registry import get_objective, list_objectives, objective_parameters, register_objective, target

__all__ = ["Objective", "TokenInputs", "TokenTerms", "TargetObjective", "LossResult", "token_loss",
           "get_objective", "list_objectives", "objective_parameters", "register_objective", "target"]
