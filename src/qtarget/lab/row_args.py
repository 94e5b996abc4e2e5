"""`--objective_args ROW.PARAM=V,...`: a lab row's parameters, given on the command line.

Every row trains with its lab parameters (`settings.OBJECTIVE_ARGS`, the papers' values) or, for any other
registered objective, its registry defaults; `--objective_args profit.tau=0.2,psft.eps=0.2` replaces single
parameters of single rows. Values are numbers where they parse as numbers, true/false as booleans, else
strings (rule names). Every row is built once here, so a bad name or value fails before anything runs.
"""
from __future__ import annotations

from typing import Any, Sequence

from qtarget.lab.settings import OBJECTIVE_ARGS, OBJECTIVES, ROW_OBJECTIVE
from qtarget.objectives import get_objective, objective_parameters

FLAG = "--objective_args"


def parse_value(text: str) -> Any:
    """'0.2' -> 0.2, '8' -> 8, 'true' -> True, 'p_y' -> 'p_y'."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        number = float(text)
    except ValueError:
        return text.strip()
    return int(number) if number.is_integer() and "." not in text and "e" not in low else number


def format_value(value: Any) -> str:
    """The inverse of `parse_value` for the values it produces (what `profile` writes into a command)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def parse_row_args(specs: Sequence[str] | None, rows: Sequence[str], sweep: tuple | None = None
                   ) -> dict[str, dict[str, Any]]:
    """['profit.tau=0.2,prob.alpha=1'] -> {'profit': {'tau': 0.2}, 'prob': {'alpha': 1}}: only what was given.
    `rows` are the rows this run trains; each named row must be one of them, and a swept parameter cannot be
    fixed as well. Raises ValueError naming the flag."""
    swept = {(o, p) for o, p, _ in sweep or ()}
    out: dict[str, dict[str, Any]] = {}
    for spec in specs or ():
        for item in (s.strip() for s in spec.split(",")):
            if not item:
                continue
            name, sep, value = item.partition("=")
            row, dot, param = name.strip().partition(".")
            if not sep or not dot or not row or not param or not value.strip():
                raise ValueError(f"{FLAG} {item!r}: expected ROW.PARAM=VALUE (e.g. profit.tau=0.2)")
            if row not in rows:
                raise ValueError(f"{FLAG} {item!r}: row {row!r} is not trained in this run (rows: {', '.join(rows)})")
            objective = ROW_OBJECTIVE.get(row, row)
            if param not in objective_parameters(objective):
                raise ValueError(f"{FLAG} {item!r}: {objective} has no parameter {param!r}; its parameters: "
                                 f"{', '.join(objective_parameters(objective)) or 'none'}")
            if (row, param) in swept:
                raise ValueError(f"{FLAG} {item!r}: {row}.{param} is swept by --sweep; fix it or sweep it, not both")
            if param in out.get(row, {}):
                raise ValueError(f"{FLAG}: {row}.{param} is given twice")
            out.setdefault(row, {})[param] = parse_value(value)
    for row, given in out.items():
        try:
            get_objective(ROW_OBJECTIVE.get(row, row), **{**OBJECTIVE_ARGS.get(row, {}), **given})
        except (TypeError, ValueError) as e:
            raise ValueError(f"{FLAG} {', '.join(f'{row}.{k}={v}' for k, v in given.items())}: {e}") from None
    return out


def merged_objective_args(given: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]] | None:
    """The lab's per-row parameters with `given` laid over them (None when nothing was given, so the
    settings keep their default and their digest)."""
    if not given:
        return None
    merged = {k: dict(v) for k, v in OBJECTIVE_ARGS.items()}
    for row, args in given.items():
        merged[row] = {**merged.get(row, {}), **args}
    return merged


def lab_rows(objectives: Sequence[str] | None, sweep: tuple | None) -> list[str]:
    """The rows a run trains: the given objectives, sft and the swept objective, or the default rows."""
    if sweep:
        return ["sft", sweep[0][0]]
    return list(objectives) if objectives else list(OBJECTIVES)
