"""The target_sft teacher, obtained honestly: the base model fine-tuned with plain SFT on more
demonstrations than a student sees, all clean (no noise), drawn from a seed stream disjoint from the
students' data and the evaluation sets. Same vocabulary as the student by construction.

It is cached under `<qtarget cache>/lab-teachers/<key>`, the key hashing the base model's identity and
every setting that shapes the teacher, so later runs reuse it and the report says which it was.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from torch import nn

from qtarget.lab.finetune import finetune
from qtarget.lab.precision import compute_context, inference_model
from qtarget.lab.settings import LabSettings
from qtarget.lab.task import LabTask
from qtarget.lab.trunk import bottom_states
from qtarget.models.cache import atomic_dir, cache_root, file_lock
from qtarget.models.load import load_model

TEACHER_KEYS = ("model", "teacher_examples", "teacher_steps", "batch_size", "learning_rate", "warmup_ratio",
                "lr_scheduler", "weight_decay", "train_top_layers", "max_length", "precision")
TEACHER_DATA_SEED = 7_000_000  # the teacher's problems: a stream no student or eval set uses
# How the teacher is trained, beyond the settings in the key: raise it whenever a change of the code alters
# the trained weights, so that no cache entry made by earlier code is reused (a fresh machine would train
# another teacher and not reproduce the run). 2: the top layers on the shared frozen trunk, bf16 pre-cast
# copies for the no-grad passes, one right-padding helper.
TEACHER_RECIPE = 2


def teacher_key(settings: LabSettings, model_id: str, task: LabTask) -> str:
    body = json.dumps({"model_id": model_id, "task": task.name, "task_version": task.version,
                       "recipe": TEACHER_RECIPE,
                       **{k: settings.to_dict()[k] for k in TEACHER_KEYS}}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def teacher_dir(settings: LabSettings, model_id: str, task: LabTask, cache_dir: Path | None = None) -> Path:
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    return root / "lab-teachers" / teacher_key(settings, model_id, task)


def describe(settings: LabSettings, model_name: str) -> str:
    return (f"{model_name} fine-tuned with SFT on {settings.teacher_examples} clean demonstrations "
            f"({settings.teacher_steps} steps of {settings.batch_size}, lr {settings.learning_rate:g}, top "
            f"{settings.train_top_layers or 'all'} layers trained), problems from a seed stream disjoint from "
            f"the students' data and the evaluation sets")


def obtain_teacher(settings: LabSettings, base: nn.Module, tokenizer, task: LabTask, *, model_id: str, model_name: str,
                   make_examples: Callable[[int, int], list[dict]], work_dir: Path,
                   cache_dir: Path | None = None, use_cache: bool = True,
                   on_step: Callable[[], None] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """(teacher model, info). `make_examples(n, seed)` gives tokenised clean demonstrations.
    info: description, cached (bool), path, seconds, key, history (when trained now)."""
    folder = teacher_dir(settings, model_id, task, cache_dir)
    # the cache entry relative to the cache root: reports carry no absolute path of the machine
    info: dict[str, Any] = {"description": describe(settings, model_name), "key": folder.name,
                            "path": f"<qtarget cache>/lab-teachers/{folder.name}", "examples": settings.teacher_examples,
                            "steps": settings.teacher_steps}
    t0 = time.perf_counter()
    if use_cache and (folder / "lab-teacher.json").exists():
        teacher = load_model(str(folder), role="teacher", dtype="float32")
        saved = json.loads((folder / "lab-teacher.json").read_text())
        info.update(cached=True, seconds=time.perf_counter() - t0, history=saved.get("history", []),
                    trained_seconds=saved.get("seconds"))
        return teacher, info

    examples = make_examples(settings.teacher_examples, TEACHER_DATA_SEED)
    # like every student, the teacher trains its top layers on the frozen trunk, computed once (the same run
    # as full forwards up to float rounding, `tests/test_lab_trunk.py`)
    layers = len(base.get_decoder().layers)
    trunk = None
    if 0 < settings.train_top_layers < layers:
        with compute_context(settings.precision, base):
            trunk = bottom_states(inference_model(base, settings.precision), [e["input_ids"] for e in examples],
                                  layers - settings.train_top_layers,
                                  pad_token_id=tokenizer.pad_token_id, batch_size=settings.score_batch_size)
    teacher, run = finetune(settings, base, tokenizer, examples, "sft", seed=TEACHER_DATA_SEED % 1000,
                            output_dir=work_dir, steps=settings.teacher_steps, on_step=on_step, trunk=trunk)
    run["seconds"] = time.perf_counter() - t0
    info.update(cached=False, seconds=run["seconds"], history=run["history"], trained_seconds=run["seconds"])
    if use_cache:
        with file_lock(folder.parent / f".{folder.name}.lock"):
            with atomic_dir(folder) as tmp:
                teacher.save_pretrained(tmp)
                (tmp / "lab-teacher.json").write_text(json.dumps(
                    {"description": info["description"], "settings": {k: settings.to_dict()[k] for k in TEACHER_KEYS},
                     "model_id": model_id, "seconds": run["seconds"], "history": run["history"]}, indent=1))
    return teacher, info


def clear_teacher(settings: LabSettings, model_id: str, task: LabTask, cache_dir: Path | None = None) -> None:
    folder = teacher_dir(settings, model_id, task, cache_dir)
    if folder.exists():
        shutil.rmtree(folder)
    os.makedirs(folder.parent, exist_ok=True)
