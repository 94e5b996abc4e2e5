"""Compare two lab runs the way the lab promises reproduction (`qtarget lab --compare DIR_A DIR_B`).

On the same machine (CPU model, torch, precision, threads) the same settings give a byte-identical
results.csv. On another CPU the bf16 (and, less so, float32) kernels round differently, so the values move
a little; what is promised there is the verdicts with their intervals. This module reads two results.json,
says per claim whether the verdict agrees and how far its effect moved relative to its interval, and per
estimate how far the value moved. A verdict that turns from supported to contradicted (or back) is a
reversal: the only outcome that `--compare` reports with a non-zero exit status. A claim that becomes or
stops being inconclusive is reported, not failed: an interval that touches the decision boundary on one
machine can cross it on another.
"""
from __future__ import annotations

import json
import math
import os
import platform
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers

from qtarget.lab.analysis import upgrade_results
from qtarget.lab.precision import cpu_flags

# the fields of results.json's "machine" that say which kernels ran (precision and threads are settings)
MACHINE_KEYS = ("cpu", "cpu_flags", "cpu_capability", "torch")
# settings that change how the numbers are computed, not the experiment: values move by rounding only
COMPUTE_SETTINGS = ("precision", "threads")
REVERSAL = frozenset({"supported", "contradicted"})
# CPU features that change which bf16 / float32 kernels run (native bf16 dot products, AMX tiles)
KERNEL_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile")


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo; elsewhere what `platform` knows)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def kernel_flags() -> list[str]:
    """Which of KERNEL_FLAGS the CPU reports (Linux; empty elsewhere)."""
    have = cpu_flags()
    return [flag for flag in KERNEL_FLAGS if flag in have]


def machine_info(precision: str, threads: int) -> dict[str, Any]:
    """results.json's "machine": where the numbers came from. The same machine kind (CPU model and
    kernels), versions, precision and threads give the same bits; another CPU rounds differently."""
    return {"cpu": cpu_model(), "cpu_flags": kernel_flags(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "logical_cpus": os.cpu_count(), "os": f"{platform.system()} {platform.machine()}",
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "numpy": np.__version__, "precision": precision, "threads": threads}


def load_results(path: str | Path) -> dict[str, Any]:
    """A lab results.json, given as the run's output folder or as the file itself."""
    p = Path(path)
    file = p / "results.json" if p.is_dir() else p
    if not file.is_file():
        raise FileNotFoundError(f"--compare: no lab results at {str(path)!r} (expected a lab output folder with "
                                f"results.json, or a results.json)")
    try:
        results = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"--compare: {str(file)!r} is not a lab results.json ({e})") from None
    if not isinstance(results, dict) or not ("per_task" in results or "rows" in results):
        raise ValueError(f"--compare: {str(file)!r} is not a lab results.json (no per_task entry)")
    return upgrade_results(results)


def half_width(effect: dict[str, Any]) -> float:
    return (float(effect["hi"]) - float(effect["lo"])) / 2.0


def moved_in_half_widths(a: dict[str, Any], b: dict[str, Any]) -> float:
    """|value_b - value_a| in units of the wider of the two intervals' half-widths (0 when nothing moved;
    inf when the value moved and both intervals are points)."""
    shift = abs(float(b["value"]) - float(a["value"]))
    width = max(half_width(a), half_width(b))
    if shift == 0.0:
        return 0.0
    return shift / width if width > 0 else math.inf


def relative_change(a: float, b: float) -> float:
    """|b - a| / max(|a|, |b|): 0 for equal values, at most 2 (a sign change)."""
    scale = max(abs(a), abs(b))
    return 0.0 if scale == 0.0 else abs(b - a) / scale


def inside_each_other(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Each run's value lies inside the other run's interval."""
    return float(a["lo"]) <= float(b["value"]) <= float(a["hi"]) and float(b["lo"]) <= float(a["value"]) <= float(b["hi"])


@dataclass(frozen=True)
class ClaimShift:
    """One claim (task, row, versus, metric, kind) in both runs."""

    task: str
    row: str
    versus: str
    metric: str
    kind: str
    statement: str
    verdict_a: str
    verdict_b: str
    effect_a: dict[str, Any]
    effect_b: dict[str, Any]

    @property
    def agrees(self) -> bool:
        return self.verdict_a == self.verdict_b

    @property
    def reversed(self) -> bool:
        """supported on one side, contradicted on the other."""
        return {self.verdict_a, self.verdict_b} == REVERSAL

    @property
    def moved(self) -> float:
        return moved_in_half_widths(self.effect_a, self.effect_b)

    @property
    def inside(self) -> bool:
        return inside_each_other(self.effect_a, self.effect_b)


@dataclass(frozen=True)
class EstimateShift:
    """One number of results.csv (an estimate, or a paired difference from the reference row) in both runs."""

    task: str
    row: str
    metric: str
    kind: str          # "estimate" or "difference"
    a: dict[str, Any]
    b: dict[str, Any]

    @property
    def relative(self) -> float:
        return relative_change(float(self.a["value"]), float(self.b["value"]))

    @property
    def moved(self) -> float:
        return moved_in_half_widths(self.a, self.b)

    @property
    def inside(self) -> bool:
        return inside_each_other(self.a, self.b)


@dataclass
class LabComparison:
    label_a: str
    label_b: str
    machine_a: dict[str, Any] | None
    machine_b: dict[str, Any] | None
    settings_differ: dict[str, tuple[Any, Any]]
    claims: list[ClaimShift]
    estimates: list[EstimateShift]
    only_a: list[tuple] = field(default_factory=list)   # claims in one run only
    only_b: list[tuple] = field(default_factory=list)
    csv_identical: bool | None = None                   # None: a results.csv is missing
    # tasks whose generator version differs (task -> (version A, version B)): their items differ
    tasks_differ: dict[str, tuple[Any, Any]] = field(default_factory=dict)

    @property
    def reversals(self) -> list[ClaimShift]:
        return [c for c in self.claims if c.reversed]

    @property
    def exit_code(self) -> int:
        """1 when a verdict flipped between supported and contradicted, else 0."""
        return 1 if self.reversals else 0

    @property
    def same_machine(self) -> bool | None:
        if not self.machine_a or not self.machine_b:
            return None
        return all(self.machine_a.get(k) == self.machine_b.get(k) for k in MACHINE_KEYS)

    def render(self) -> str:
        return render_comparison(self)


def _claim_key(task: str, c: dict[str, Any]) -> tuple[str, str, str, str, str]:
    return task, c["row"], c["versus"], c["metric"], c.get("kind", "")


def _claims(results: dict[str, Any]) -> dict[tuple, dict[str, Any]]:
    out: dict[tuple, dict[str, Any]] = {}
    for task, entry in results["per_task"].items():
        for c in entry.get("claims") or []:
            key = _claim_key(task, c)
            if key in out:
                raise ValueError(f"--compare: claim {key} appears twice in one results.json")
            out[key] = c
    return out


def _numbers(results: dict[str, Any]) -> dict[tuple, dict[str, Any]]:
    """Every number results.csv holds: (task, row, metric, kind) -> its estimate with interval."""
    out: dict[tuple, dict[str, Any]] = {}
    for task, entry in results["per_task"].items():
        for kind, table in (("estimate", entry.get("estimates") or {}), ("difference", entry.get("vs_reference") or {})):
            for row, by_metric in table.items():
                for metric, e in (by_metric or {}).items():
                    if e and "value" in e:
                        out[(task, row, metric, kind)] = e
    return out


def _csv_identical(a: str | Path, b: str | Path) -> bool | None:
    fa, fb = (Path(p) / "results.csv" if Path(p).is_dir() else Path(p).with_name("results.csv") for p in (a, b))
    if not fa.is_file() or not fb.is_file():
        return None
    return fa.read_bytes() == fb.read_bytes()


def compare_results(a: str | Path, b: str | Path) -> LabComparison:
    """Compare the lab runs in output folders (or results.json files) `a` and `b`."""
    ra, rb = load_results(a), load_results(b)
    sa, sb = ra.get("settings") or {}, rb.get("settings") or {}
    differ = {k: (sa.get(k), sb.get(k)) for k in sorted(set(sa) | set(sb)) if sa.get(k) != sb.get(k)}
    ca, cb = _claims(ra), _claims(rb)
    claims = [ClaimShift(task=k[0], row=k[1], versus=k[2], metric=k[3], kind=k[4], statement=ca[k].get("statement", ""),
                         verdict_a=ca[k]["verdict"], verdict_b=cb[k]["verdict"], effect_a=ca[k]["effect"],
                         effect_b=cb[k]["effect"])
              for k in ca if k in cb]
    na, nb = _numbers(ra), _numbers(rb)
    estimates = [EstimateShift(task=k[0], row=k[1], metric=k[2], kind=k[3], a=na[k], b=nb[k]) for k in na if k in nb]
    return LabComparison(label_a=str(a), label_b=str(b), machine_a=ra.get("machine"), machine_b=rb.get("machine"),
                         settings_differ=differ, claims=claims, estimates=estimates,
                         only_a=[k for k in ca if k not in cb], only_b=[k for k in cb if k not in ca],
                         csv_identical=_csv_identical(a, b), tasks_differ=_task_versions_differ(ra, rb))


def _task_versions_differ(ra: dict[str, Any], rb: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Tasks both runs have whose generator version differs (their evaluation items or data differ)."""
    def versions(r: dict[str, Any]) -> dict[str, Any]:
        return {t: ((e.get("data") or {}).get("task") or {}).get("version") for t, e in r["per_task"].items()}
    va, vb = versions(ra), versions(rb)
    return {t: (va[t], vb[t]) for t in va if t in vb and va[t] != vb[t]}


def describe_machine(machine: dict[str, Any] | None) -> str:
    if not machine:
        return "machine not recorded (a results.json from before the lab recorded it)"
    return (f"{machine.get('cpu', '?')} ({machine.get('cpu_capability', '?')} kernels), torch {machine.get('torch', '?')}, "
            f"{machine.get('precision', '?')}, threads {machine.get('threads', '?')}")


def _pct(x: float) -> str:
    return "inf" if math.isinf(x) else f"{100 * x:.1f} %"


def _hw(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.2f}"


def render_comparison(cmp: LabComparison) -> str:
    lines = [f"A: {cmp.label_a}: {describe_machine(cmp.machine_a)}",
             f"B: {cmp.label_b}: {describe_machine(cmp.machine_b)}"]
    compute = {k: v for k, v in cmp.settings_differ.items() if k in COMPUTE_SETTINGS}
    experiment = {k: v for k, v in cmp.settings_differ.items() if k not in COMPUTE_SETTINGS}
    if cmp.same_machine and not cmp.settings_differ:
        lines.append("the same machine kind (CPU, kernels, torch) and settings: results.csv should be byte-identical")
    elif cmp.same_machine is False:
        differ = [k for k in MACHINE_KEYS if cmp.machine_a.get(k) != cmp.machine_b.get(k)]
        lines.append(f"another machine kind ({', '.join(differ)} differ): values move by kernel rounding; the "
                     f"verdicts with their intervals are what should agree")
    if compute:
        lines.append(f"compute settings differ ({_settings(compute)}): values may move by rounding; the verdicts "
                     f"with their intervals are what should agree")
    if experiment:
        lines.append(f"settings differ ({_settings(experiment)}): two experiments, not a reproduction")
    if cmp.tasks_differ:
        lines.append("task versions differ (" + ", ".join(f"{t}: {va} vs {vb}" for t, (va, vb) in cmp.tasks_differ.items())
                     + "): the tasks' data or evaluation items differ; on those tasks two experiments, not a "
                       "reproduction")
    if cmp.csv_identical is not None:
        lines.append(f"results.csv: {'byte-identical' if cmp.csv_identical else 'differs'}")
    if cmp.estimates:
        moved = [e for e in cmp.estimates if e.a["value"] != e.b["value"]]
        rel = [e.relative for e in cmp.estimates]
        worst = max(cmp.estimates, key=lambda e: (e.relative, e.moved))
        farthest = max(cmp.estimates, key=lambda e: e.moved)
        outside = sum(not e.inside for e in cmp.estimates)
        lines.append(f"numbers: none of {len(cmp.estimates)} moved" if not moved else
                     f"numbers: {len(moved)} of {len(cmp.estimates)} moved; relative change median "
                     f"{_pct(statistics.median(rel))}, largest {_pct(worst.relative)} ({worst.task} {worst.row} "
                     f"{worst.metric}, {worst.kind}); largest move {_hw(farthest.moved)} interval half-widths "
                     f"({farthest.task} {farthest.row} {farthest.metric}, {farthest.kind}); {outside} outside the "
                     f"other run's interval")
    agree = sum(c.agrees for c in cmp.claims)
    lines.append(f"claims: {agree} of {len(cmp.claims)} verdicts agree; {len(cmp.reversals)} reversed "
                 f"(supported <-> contradicted)")
    if cmp.claims:
        lines += ["", "| task | claim | row vs | A | B | effect A | effect B | moved (half-widths) |",
                  "|---|---|---|---|---|---|---|---:|"]
        for c in cmp.claims:
            mark = "REVERSED " if c.reversed else "" if c.agrees else "changed "
            lines.append(f"| {c.task} | {mark}{c.statement} ({c.metric}) | {c.row} vs {c.versus} | {c.verdict_a} | "
                         f"{c.verdict_b} | {_effect(c.effect_a)} | {_effect(c.effect_b)} | {_hw(c.moved)} |")
    for side, keys in (("A", cmp.only_a), ("B", cmp.only_b)):
        if keys:
            lines.append(f"claims only in {side}: " + "; ".join(" ".join(k[:4]) for k in keys))
    return "\n".join(lines)


def _settings(differ: dict[str, tuple[Any, Any]], shown: int = 6) -> str:
    text = ", ".join(f"{k}: {va!r} vs {vb!r}" for k, (va, vb) in list(differ.items())[:shown])
    return text + (f", and {len(differ) - shown} more" if len(differ) > shown else "")


def _effect(e: dict[str, Any]) -> str:
    return f"{float(e['value']):+.3f} [{float(e['lo']):+.3f}, {float(e['hi']):+.3f}]"
