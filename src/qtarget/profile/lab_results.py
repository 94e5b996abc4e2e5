"""`qtarget profile --lab_results DIR`: what the user's own `qtarget lab` run measured, read back through the
lab's statistics (`lab.analysis`: the same per-item values, bootstrap settings and paired differences as its
report), so the advice can say which objective won on the user's data, with its interval."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qtarget.lab.analysis import METRIC_BY_KEY, estimate, upgrade_results, winners
from qtarget.objectives import get_objective

FLAG = "--lab_results"


@dataclass
class TaskOutcome:
    """One task of a lab run: each row's objective and parameters, the decision metrics' winners, and each
    trained row's paired difference from the reference (sft) on them."""

    task: str
    rows: dict[str, tuple[str, dict[str, Any]]]  # trained row -> (objective, parameters)
    winners: list[dict[str, Any]]
    vs_reference: dict[str, dict[str, dict[str, Any]]]
    reference: str = "sft"

    def row_for(self, objective: str, args: dict[str, Any]) -> str | None:
        """The row that trained `objective` with exactly these parameters (as the objective builds them)."""
        want = _params(objective, args)
        for name, (obj, a) in self.rows.items():
            if want is not None and obj == objective and _params(obj, a) == want:
                return name
        return None

    def primary(self) -> dict[str, Any] | None:
        return self.winners[0] if self.winners else None

    def lines(self) -> list[str]:
        out = []
        for w in self.winners:
            m = METRIC_BY_KEY[w["metric"]]
            lead = w["lead"]
            state = ("decided: the lead's interval excludes 0" if w["decided"] else
                     f"not separated from {', '.join(w['tied'])}")
            out.append(f"task {self.task}, {m.title} ({m.better} is better): {w['row']} won with "
                       f"{_fmt(w['value'], m.decimals)}, {lead['value']:+.{m.decimals}f} [{lead['lo']:+.{m.decimals}f}, "
                       f"{lead['hi']:+.{m.decimals}f}] ahead of {w['runner_up']} ({state})")
        return out


@dataclass
class LabOutcome:
    source: str
    model: str
    tasks: list[TaskOutcome] = field(default_factory=list)

    def lines(self) -> list[str]:
        return [line for t in self.tasks for line in t.lines()]


def _params(objective: str | None, args: dict[str, Any]) -> dict[str, Any] | None:
    if not objective:
        return None
    try:
        return dict(get_objective(objective, **args).params)
    except (TypeError, ValueError, KeyError):
        return None  # an objective this version cannot build matches nothing


def _fmt(e: dict[str, Any], decimals: int) -> str:
    return f"{e['value']:.{decimals}f} [{e['lo']:.{decimals}f}, {e['hi']:.{decimals}f}]"


def read_lab_results(path: str | Path) -> LabOutcome:
    """A lab output folder (or its results.json) -> LabOutcome. Raises OSError / ValueError naming the flag."""
    p = Path(path)
    file = p / "results.json" if p.is_dir() else p
    if not file.is_file():
        raise FileNotFoundError(f"{FLAG} {str(path)!r}: no results.json there (the output folder of `qtarget lab`)")
    try:
        results = upgrade_results(json.loads(file.read_text(encoding="utf-8")))
        settings = results["settings"]
        kw = dict(n_boot=int(settings["n_boot"]), seed=int(settings["seed"]))
        tasks = []
        for name, entry in results["per_task"].items():
            items = {r: {k: np.asarray(v, dtype=np.float64) for k, v in d.items()} for r, d in entry["items"].items()}
            rows = {r: (row["objective"], dict(row.get("args") or {})) for r, row in entry["rows"].items()
                    if row.get("objective")}
            ref = "sft" if "sft" in items else None
            diffs = {r: {m: e.to_dict() for m in METRIC_BY_KEY
                         if (e := estimate(items, m, r, ref, n_boot=kw["n_boot"], seed=kw["seed"]))}
                     for r in rows if ref and r != ref}
            tasks.append(TaskOutcome(name, rows, winners(items, **kw), diffs))
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as e:
        raise ValueError(f"{FLAG} {str(file)!r} is not a results.json written by `qtarget lab` ({type(e).__name__}: "
                         f"{e})") from None
    model = (results.get("model") or {}).get("name", "?")
    return LabOutcome(str(path), model, tasks)
