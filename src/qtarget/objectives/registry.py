"""Objective registry: names -> factories, with parameter checking and the general `target` builder."""
from __future__ import annotations

import difflib
import inspect
from typing import Any, Callable

from qtarget.objectives import catalog, catalog_2026, catalog_2027
from qtarget.objectives.base import Objective
from qtarget.objectives.rules import (
    GAMMA_ALIASES,
    GAMMA_RULES,
    RESIDUAL_ALIASES,
    UNAVAILABLE_RESIDUALS,
    RESIDUAL_RULES,
    ConstantGamma,
    GammaRule,
    ResidualRule,
    TopKResidual,
    compose_gamma,
)

_REGISTRY: dict[str, Callable[..., Objective]] = {}


def register_objective(name: str, factory: Callable[..., Objective], *, overwrite: bool = False) -> None:
    """Register `factory(**params) -> Objective` under `name` (a class or a function)."""
    if not name or not isinstance(name, str):
        raise ValueError(f"objective name must be a non-empty string, got {name!r}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"objective {name!r} is already registered (pass overwrite=True to replace it)")
    _REGISTRY[name] = factory


def list_objectives() -> list[str]:
    return list(_REGISTRY)


def objective_parameters(name: str) -> dict[str, Any]:
    """Parameter names of a registered objective with their defaults (for `target`, also the rules'
    parameters, default None: a rule that reads one takes its own default)."""
    factory = _lookup(name)
    named, accepts_any = _signature(factory)
    if accepts_any and factory is target:
        named.update({k: None for k in RULE_PARAMETERS if k not in named})
    return named


def _signature(factory: Callable[..., Objective]) -> tuple[dict[str, Any], bool]:
    """({parameter: default}, whether it takes **kwargs). An Objective subclass that keeps the base
    __init__ (e.g. SFT, DFT) takes no parameters: the base class's **params are for subclasses' super()."""
    if isinstance(factory, type) and issubclass(factory, Objective) and factory.__init__ is Objective.__init__:
        return {}, False
    sig = inspect.signature(factory)
    named = {p.name: (None if p.default is inspect.Parameter.empty else p.default)
             for p in sig.parameters.values() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    return named, any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())


def objective_doc(name: str) -> str:
    """First line of the docstring of the objective's factory."""
    doc = (_lookup(name).__doc__ or "").strip()
    return doc.splitlines()[0] if doc else ""


def _lookup(name: str) -> Callable[..., Objective]:
    if name not in _REGISTRY:
        close = difflib.get_close_matches(str(name), _REGISTRY, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"unknown objective {name!r}{hint}; valid objectives: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def get_objective(name: str | Objective, **params: Any) -> Objective:
    """An objective by name with its parameters, e.g. get_objective("target_sft", eta=0.5).
    An Objective instance is returned as is (params must then be empty)."""
    if isinstance(name, Objective):
        if params:
            raise ValueError(f"parameters {sorted(params)} given with an objective instance {name!r}")
        return name
    factory = _lookup(name)
    named, accepts_any = _signature(factory)
    valid = list(named)
    unknown = [k for k in params if k not in valid]
    if unknown and not accepts_any:
        raise ValueError(f"objective {name!r} got unknown parameter(s) {unknown}; "
                         f"valid parameters: {valid or 'none (it takes no parameters)'}")
    obj = factory(**params)
    if not isinstance(obj, Objective):
        raise ValueError(f"factory for objective {name!r} returned {type(obj).__name__}, not an Objective")
    return obj


# The parameters of the named gamma / residual rules, which `target` takes as keywords.
RULE_PARAMETERS = tuple(dict.fromkeys(
    p.name for table in (GAMMA_RULES, RESIDUAL_RULES) for cls in table.values()
    for p in inspect.signature(cls).parameters.values() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)))


def rule_parameters(gamma: Any = "p_y", residual: Any = "student") -> set[str]:
    """The parameters the gamma and residual rules named `gamma` / `residual` read (a rule given as an
    instance or a number reads none)."""
    out: set[str] = set()
    for spec, table, aliases in ((gamma, GAMMA_RULES, GAMMA_ALIASES), (residual, RESIDUAL_RULES, RESIDUAL_ALIASES)):
        cls = table.get(aliases.get(spec, spec)) if isinstance(spec, str) else None
        if cls is not None:
            out |= {p.name for p in inspect.signature(cls).parameters.values()
                    if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    return out


def _make_rule(spec: Any, table: dict, aliases: dict, kind: str, params: dict[str, Any]):
    """A rule from an instance, a float (gamma only: constant) or a name whose parameters are
    taken from `params` (consumed)."""
    base = GammaRule if kind == "gamma" else ResidualRule
    if isinstance(spec, base):
        return spec
    if kind == "gamma" and isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return ConstantGamma(float(spec))
    if isinstance(spec, str):
        if kind == "residual" and spec in UNAVAILABLE_RESIDUALS:
            raise ValueError(f"residual rule {spec!r} is not available: {UNAVAILABLE_RESIDUALS[spec]}")
        key = aliases.get(spec, spec)
        if key in table:
            cls = table[key]
            names = [p for p in inspect.signature(cls).parameters]
            return cls(**{n: params.pop(n) for n in names if n in params})
    raise ValueError(f"unknown {kind} rule {spec!r}; valid {kind} rules: "
                     f"{', '.join(list(table) + list(aliases))}" + (" or a number" if kind == "gamma" else ""))


def target(gamma: Any = "p_y", residual: Any = "student", *, top_k: int | None = None, gamma_from: str = "model",
           gamma_min: float | None = None, gamma_max: float | None = None, **params: Any) -> Objective:
    """Compose any gamma rule with any residual rule: L = CE(gamma delta_y + (1-gamma) pi_tilde, p).

    gamma: a GammaRule, a number (constant) or a name in rules.GAMMA_RULES
           (constant, p_y, power, threshold, topk_entropy, ratio, data_weight, mass, gibbs).
    residual: a ResidualRule or a name in rules.RESIDUAL_RULES
           (uniform, student, tempered, reference, teacher, geometric_mix).
    top_k: truncate the residual to its top-k and renormalise.
    gamma_from: where the gamma rule reads p_y / p: "model" (the online student) or "reference" (the
           frozen reference / base model, given as ref_logits; the objective then needs `ref`).
    gamma_min / gamma_max: gamma = clamp(gamma, gamma_min, gamma_max), a floor / cap in [0, 1].
    params: the named rules' parameters (value, alpha, tau, k, lam, gain, beta, temperature, eta).
    """
    params = dict(params)
    g = _make_rule(gamma, GAMMA_RULES, GAMMA_ALIASES, "gamma", params)
    g = compose_gamma(g, gamma_from, gamma_min, gamma_max)
    r = _make_rule(residual, RESIDUAL_RULES, RESIDUAL_ALIASES, "residual", params)
    if params:
        raise ValueError(f"objective 'target': parameter(s) {sorted(params)} are not used by gamma rule {g!r} "
                         f"or residual rule {r!r}; target's own parameters: gamma, residual, top_k, gamma_from, "
                         f"gamma_min, gamma_max; rule parameters: {', '.join(RULE_PARAMETERS)}")
    if top_k is not None:
        r = TopKResidual(r, top_k)
    return catalog.TargetObjective(g, r)


for _name, _factory in {
    "sft": catalog.SFT,
    "label_smoothing": catalog.label_smoothing,
    "dft": catalog.DFT,
    "prob": catalog.Prob,
    "profit": catalog.ProFit,
    "eaft": catalog.EAFT,
    "token_weighted": catalog.TokenWeighted,
    "sft_kl": catalog.SFTKL,
    "asft": catalog.ASFT,
    "psft": catalog.PSFT,
    "gem": catalog.GEM,
    "kd": catalog.kd,
    "distill_hybrid": catalog.DistillHybrid,
    "target_sft": catalog.target_sft,
    "target": target,
    # the catalogue of 2026 (objectives/catalog_2026.py, docs/objectives.md)
    "prob_masked": catalog_2026.ProbMasked,
    "nll_masked": catalog_2026.nll_masked,
    "prift_prob": catalog_2026.prift_prob,
    "prift_mass": catalog_2026.prift_mass,
    "deft": catalog_2026.DEFT,
    # added after the 2026 catalogue (objectives/catalog_2027.py, docs/objectives.md)
    "gift": catalog_2027.gift,
    "sed_sft": catalog_2027.SEDSFT,
    "talr": catalog_2027.talr,
}.items():
    register_objective(_name, _factory)
