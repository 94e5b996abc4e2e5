"""`--sweep` specs: `eta=0,0.5,1`, `psft.eps=0.1,0.28` or a grid over the general `target` objective
(`--sweep target.gamma=p_y,1 --sweep target.residual=student,teacher`).

A bare parameter name belongs to the one lab objective that has it; `objective.param` names it
explicitly (any registered objective). Values are numbers where they parse as numbers, else strings
(rule names). Every point is built once here, so a bad value fails before any training.
"""
from __future__ import annotations

from typing import Any, Sequence

from qtarget.lab.settings import OBJECTIVES, ROW_OBJECTIVE
from qtarget.objectives import get_objective, list_objectives, objective_parameters


def _value(text: str) -> Any:
    try:
        number = float(text)
    except ValueError:
        return text
    return int(number) if number.is_integer() and "." not in text and "e" not in text.lower() else number


def parse_sweep(specs: Sequence[str]) -> tuple[tuple[str, str, tuple[Any, ...]], ...]:
    """['eta=0,0.5'] -> (('target_sft', 'eta', (0, 0.5)),). Raises ValueError naming --sweep."""
    out = []
    for spec in specs:
        name, sep, values_text = spec.partition("=")
        name = name.strip()
        if not sep or not name or not values_text.strip():
            raise ValueError(f"--sweep {spec!r}: expected PARAM=V1,V2,... or OBJECTIVE.PARAM=V1,V2,...")
        values = tuple(_value(v.strip()) for v in values_text.split(",") if v.strip())
        if len(set(map(str, values))) != len(values) or len(values) < 2:
            raise ValueError(f"--sweep {spec!r}: give at least two distinct values")
        if "." in name:
            objective, param = name.split(".", 1)
            if objective not in list_objectives():
                raise ValueError(f"--sweep {spec!r}: unknown objective {objective!r}; choose from "
                                 f"{', '.join(list_objectives())}")
            if param not in objective_parameters(objective):
                raise ValueError(f"--sweep {spec!r}: {objective} has no parameter {param!r}; its parameters: "
                                 f"{', '.join(objective_parameters(objective)) or 'none'}")
        else:
            param = name
            owners = [o for o in OBJECTIVES if o not in ROW_OBJECTIVE and param in objective_parameters(o)]
            if len(owners) != 1:
                found = "no lab objective has it" if not owners else f"{', '.join(owners)} all have it"
                raise ValueError(f"--sweep {spec!r}: parameter {param!r} is ambiguous or unknown ({found}); "
                                 f"write OBJECTIVE.{param}=...")
            objective = owners[0]
        out.append((objective, param, values))
    if len({o for o, _, _ in out}) > 1:
        raise ValueError(f"--sweep: all swept parameters must belong to one objective, got "
                         f"{sorted({o for o, _, _ in out})}")
    if len({p for _, p, _ in out}) != len(out):
        raise ValueError("--sweep: each parameter may be swept only once")
    for objective, param, values in out:
        for v in values:
            try:
                get_objective(objective, **{param: v})
            except (TypeError, ValueError) as e:
                raise ValueError(f"--sweep {objective}.{param}={v!r}: {e}") from e
    return tuple(out)
