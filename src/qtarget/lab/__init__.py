"""The lab: compare objectives on a real pretrained model, on a CPU, in minutes (`qtarget lab`).

    from qtarget.lab import run_lab, settings_for
    results = run_lab(settings_for("quick"), "lab_output")   # writes report.md, *.png, results.json

Modules: `tasks` (procedural problems, noisy demonstrations, ranking distractors, answer checker),
`ood_text` (out-of-domain paragraphs), `settings` (presets), `sweep` (`--sweep` specs), `finetune` (one
run through `qtarget.training.train`), `teacher` (the cached target_sft teacher), `metrics` (per-item
values: teacher-forced scores on a shared frozen trunk, generation), `stats` (bootstrap intervals, paired
differences, verdicts), `analysis` (which items each number and claim uses), `runner` (orchestration),
`report` (markdown, plots, JSON/CSV; formatting only), `cli`.
"""
from __future__ import annotations

from qtarget.lab.runner import run_lab
from qtarget.lab.settings import OBJECTIVES, PRESETS, LabSettings, settings_for

__all__ = ["OBJECTIVES", "PRESETS", "LabSettings", "settings_for", "run_lab"]
