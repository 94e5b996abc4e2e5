"""The lab: compare objectives on a real pretrained model, on a CPU, in minutes (`qtarget lab`).

    from qtarget.lab import run_lab, settings_for
    results = run_lab(settings_for("quick"), "lab_output")   # writes report.md, *.png, results.json

Modules: `task` (`LabTask`: everything task-specific, as one value), `tasks` (the procedural arithmetic
generators glyph, sum and shop: problems, noisy demonstrations, distractors, answer checker), `builtin_tasks`
(each as a LabTask, by name), `user_task` (the user's model and data as a LabTask), `ood_text` (out-of-domain
paragraphs), `settings` (presets, rows), `sweep` (`--sweep` specs), `trunk` (the frozen trunk computed once,
for training and scoring the top layers alone), `finetune` (one run through `qtarget.training.train`, with
learning-curve checkpoints), `teacher` (the cached target_sft teacher), `metrics` (per-item values:
teacher-forced scores on the shared trunk, generation, the prior profile), `evaldata` (one task's sets,
scored once with the base model), `stats` (bootstrap intervals, paired differences, verdicts), `analysis`
(which items each number and claim uses; separation, continuum and budget verdicts), `runner`
(orchestration), `report` and `plots` (markdown, PNGs, JSON/CSV; formatting only), `cli`.
"""
from __future__ import annotations

from qtarget.lab.runner import run_lab
from qtarget.lab.settings import OBJECTIVES, PRESETS, LabSettings, settings_for

__all__ = ["OBJECTIVES", "PRESETS", "LabSettings", "settings_for", "run_lab"]
