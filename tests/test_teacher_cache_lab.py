"""The lab's target_sft row trains from a teacher cache (no teacher forward per step), and that cache
holds the lab teacher's distribution."""
from __future__ import annotations

import copy

import torch

from qtarget.lab import tasks
from qtarget.lab.finetune import TEACHER_TOP_K, finetune
from qtarget.lab.precision import compute_context
from qtarget.lab.runner import load_base, tokenize
from qtarget.lab.settings import settings_for
from qtarget.models.load import freeze
from qtarget.teacher_cache import TeacherCache


def test_lab_target_sft_reads_its_teacher_from_a_cache(tmp_path):
    settings = settings_for("tiny")
    base, tok, _ = load_base(settings)
    rows = tasks.demonstrations(tasks.shop_problems(6, seed=1), noise=0.0, seed=1)
    examples = tokenize(tok, rows, settings.max_length, tasks.INSTRUCTION)
    teacher = freeze(copy.deepcopy(base))
    with torch.no_grad():
        teacher.get_output_embeddings().weight.mul_(3.0)  # a teacher that differs from the student
    run_dir = tmp_path / "runs" / "target_sft-seed0"
    model, info = finetune(settings, base, tok, examples, "target_sft", 0, run_dir, teacher=teacher)
    assert info["teacher_cache"]["top_k"] == TEACHER_TOP_K and info["steps"] == settings.steps
    (folder,) = (tmp_path / "runs" / f"teacher-caches-{settings.precision}").iterdir()
    cache = TeacherCache(folder)
    row = cache.row("train", 0)
    # the cached top-1 of the first supervised token is the teacher's own argmax there
    batch = {"input_ids": torch.tensor([examples[0]["input_ids"]])}
    with torch.no_grad(), compute_context(settings.precision, teacher):  # the precision the cache was built in
        logits = teacher(**batch).logits[0]
    t = int(row.positions[0])
    assert examples[0]["labels"][t] != -100
    assert int(row.topk.ids[0, 0]) == int(logits[t - 1].argmax())
    assert all(r["kl_teacher"] > 0 for r in info["history"])
