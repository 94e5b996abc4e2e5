"""The lab teacher's cache key: it changes with everything that shapes the teacher (model, task and its
version, each teacher setting, the training recipe's version) and with nothing else, so a cached teacher is
reused exactly when this code would train the same one."""
from __future__ import annotations

import dataclasses

import pytest

from qtarget.lab import teacher
from qtarget.lab.builtin_tasks import build_task
from qtarget.lab.settings import LabSettings
from qtarget.lab.teacher import TEACHER_KEYS, teacher_key

SETTINGS = LabSettings()
GLYPH = build_task("glyph", SETTINGS)
KEY = teacher_key(SETTINGS, "smollm2", GLYPH)


def changed(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value * 2 + 1
    return {"bf16": "fp32", "fp32": "bf16"}.get(value, f"{value}-other")


@pytest.mark.parametrize("name", [k for k in TEACHER_KEYS if k != "model"])
def test_each_teacher_setting_changes_the_key(name):
    other = dataclasses.replace(SETTINGS, **{name: changed(getattr(SETTINGS, name))})
    assert teacher_key(other, "smollm2", GLYPH) != KEY, name


def test_model_task_and_task_version_change_the_key():
    assert teacher_key(SETTINGS, "another-model", GLYPH) != KEY
    assert teacher_key(SETTINGS, "smollm2", build_task("sum", SETTINGS)) != KEY
    assert teacher_key(SETTINGS, "smollm2", dataclasses.replace(GLYPH, version=GLYPH.version + "-next")) != KEY


def test_a_new_recipe_version_never_reuses_an_old_cache_entry(monkeypatch):
    monkeypatch.setattr(teacher, "TEACHER_RECIPE", teacher.TEACHER_RECIPE + 1)
    assert teacher_key(SETTINGS, "smollm2", GLYPH) != KEY


def test_settings_that_only_shape_the_students_leave_the_key():
    students_only = {"steps": SETTINGS.steps + 8, "seeds": SETTINGS.seeds + 1, "noise": 0.5 - SETTINGS.noise / 2,
                     "eval_in_domain": SETTINGS.eval_in_domain + 5, "rank_items": SETTINGS.rank_items + 4,
                     "n_boot": SETTINGS.n_boot + 100}
    assert not set(students_only) & set(TEACHER_KEYS)
    other = dataclasses.replace(SETTINGS, **students_only)
    assert other.to_dict() != SETTINGS.to_dict()
    assert teacher_key(other, "smollm2", GLYPH) == KEY
