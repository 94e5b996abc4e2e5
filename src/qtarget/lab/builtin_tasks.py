"""The lab's built-in tasks by name: each a function `(settings) -> LabTask` (see `qtarget.lab.task`)."""
from __future__ import annotations

from typing import Callable

from qtarget.lab.settings import LabSettings
from qtarget.lab.task import LabTask
from qtarget.lab.tasks import shop_task, sum_task

BUILTIN_TASKS: dict[str, Callable[[LabSettings], LabTask]] = {"shop": shop_task, "sum": sum_task}


def build_task(name: str, settings: LabSettings) -> LabTask:
    """The built-in task `name` for `settings`' sizes and seed."""
    if name not in BUILTIN_TASKS:
        raise ValueError(f"unknown lab task {name!r}; choose from {', '.join(BUILTIN_TASKS)}")
    return BUILTIN_TASKS[name](settings)
