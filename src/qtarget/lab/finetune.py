"""One lab fine-tuning run through the library's real trainer (`qtarget.training.train`).

Every run starts from a fresh copy of the base model with the same trainable set: the top
`train_top_layers` decoder layers and the final norm. The embeddings (tied to the LM head) and the
bottom layers stay frozen, so their activations need no backward pass; that is what makes a 135M
model trainable in minutes on 2 CPU cores, and it is the same for every objective.
"""
from __future__ import annotations

import contextlib
import copy
import io
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn
from transformers import TrainerCallback

from qtarget.data import ExampleDataset
from qtarget.lab.metrics import shares_trunk
from qtarget.lab.precision import bf16_head, compute_context, inference_model
from qtarget.lab.settings import LabSettings
from qtarget.lab.trunk import TopOnly, TrunkLookup
from qtarget.models.head import head_rows
from qtarget.models.load import freeze
from qtarget.teacher_cache import build_cache, cache_folder
from qtarget.training import QTargetConfig, train

# The target_sft teacher reaches training as a cached top-k (qtarget teacher-cache): one teacher forward
# over the run's demonstrations, none per step. k = 64 with the tail spread like the student's p
# (docs/teacher_cache.md measures its error against the live teacher).
TEACHER_TOP_K = 64
TEACHER_TAIL = "student"


def set_trainable(model: nn.Module, top_layers: int) -> dict[str, int]:
    """Freeze everything but the top `top_layers` decoder layers and the final norm (0 = train all).
    Returns {trainable, total} parameter counts (tied weights counted once)."""
    for p in model.parameters():
        p.requires_grad_(top_layers == 0)
    if top_layers > 0:
        decoder = model.get_decoder()
        layers = decoder.layers
        if top_layers > len(layers):
            raise ValueError(f"train_top_layers={top_layers} but the model has only {len(layers)} layers")
        for layer in layers[len(layers) - top_layers:]:
            for p in layer.parameters():
                p.requires_grad_(True)
        for p in decoder.norm.parameters():
            p.requires_grad_(True)
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return {"trainable": trainable, "total": total}


class StepCallback(TrainerCallback):
    """Calls `on_step()` after every optimizer step (drives the lab's single progress display) and
    `on_checkpoint(step)` after the optimizer steps listed in `checkpoints` (the learning curves)."""

    def __init__(self, on_step: Callable[[], None] | None, checkpoints: Sequence[int] = (),
                 on_checkpoint: Callable[[int], None] | None = None) -> None:
        self.on_step, self.checkpoints, self.on_checkpoint = on_step, set(checkpoints), on_checkpoint

    def on_step_end(self, args, state, control, **kwargs):
        if self.on_checkpoint is not None and state.global_step in self.checkpoints:
            self.on_checkpoint(state.global_step)
        if self.on_step is not None:
            self.on_step()


def train_config(settings: LabSettings, objective: str, seed: int, output_dir: Path, *, steps: int | None = None,
                 objective_args: dict[str, Any] | None = None):
    """The QTargetConfig every lab run shares; only objective, its parameters and the seed vary
    (`objective_args` default: the settings' parameters for `objective`)."""
    steps = int(steps or settings.steps)
    if objective_args is None:
        objective_args = settings.objective_args.get(objective, {})
    return QTargetConfig(
        output_dir=str(output_dir), objective=objective, objective_args=dict(objective_args),
        max_steps=steps, per_device_train_batch_size=settings.batch_size, gradient_accumulation_steps=1,
        learning_rate=settings.learning_rate, lr_scheduler_type=settings.lr_scheduler,
        warmup_steps=max(1, round(settings.warmup_ratio * steps)) if settings.warmup_ratio > 0 else 0,
        weight_decay=settings.weight_decay, max_grad_norm=1.0, seed=seed, data_seed=seed,
        psft_updates_per_batch=settings.psft_updates_per_batch, max_length=settings.max_length,
        logging_steps=1, save_strategy="no", report_to="none", plot=False, disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, dtype="float32",
        overwrite_output_dir=True,  # a run's folder is the lab's scratch space: a rerun of the lab replaces it
    )


def finetune(settings: LabSettings, base: nn.Module, tokenizer, train_examples: list[dict[str, Any]],
             objective: str, seed: int, output_dir: Path, *, teacher: nn.Module | None = None,
             steps: int | None = None, objective_args: dict[str, Any] | None = None,
             on_step: Callable[[], None] | None = None, trunk: TrunkLookup | None = None,
             checkpoints: Sequence[int] = (), on_checkpoint: Callable[[int, nn.Module], None] | None = None,
             ref_model: nn.Module | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Fine-tune a copy of `base` with `objective`. The frozen `base` itself is the reference (pi_base)
    of objectives that have one; `teacher` (the target_sft teacher) is run once over `train_examples` into
    a top-k cache next to `output_dir`, and training reads the cache.

    `trunk` (the base's hidden states entering the first trained layer, for every training sequence): the
    student and the reference then run the trained top layers only (`qtarget.lab.trunk`), the same numbers
    up to float rounding at a fraction of the cost. Matrix products run in `settings.precision`
    (`qtarget.lab.precision`), the same for every row. `on_checkpoint(step, model)` runs after each step in
    `checkpoints` with the full model in eval-ready form (the lab's learning curves). `ref_model`: the
    reference of objectives that have one (default `base`; the lab passes `base`'s
    `qtarget.lab.precision.inference_model`, the same numbers without casting its weights every step).
    Returns (model, {history, seconds, params, ...})."""
    model = copy.deepcopy(base)
    params = set_trainable(model, settings.train_top_layers)
    model.train()
    config = train_config(settings, objective, seed, output_dir, steps=steps, objective_args=objective_args)
    needs = config.objective_needs
    t0 = time.perf_counter()
    split = len(model.get_decoder().layers) - settings.train_top_layers
    use_trunk = trunk is not None and settings.train_top_layers > 0
    cache_info = None
    if "teacher" in needs:
        if teacher is None:
            raise ValueError(f"{objective} needs the lab's teacher model")
        folder = cache_folder(Path(output_dir).parent / f"teacher-caches-{settings.precision}", teacher,
                              train_examples, top_k=TEACHER_TOP_K)
        # a teacher that shares the base's frozen trunk (the lab's own: SFT of the same top layers) runs its
        # top layers only, on the trunk the students train on
        on_trunk = use_trunk and shares_trunk(base, teacher, split)
        fast_teacher = inference_model(teacher, settings.precision)
        with contextlib.ExitStack() as stack:
            stack.enter_context(compute_context(settings.precision, teacher))
            if on_trunk:
                stack.enter_context(TopOnly(fast_teacher, trunk, split))
            build_cache(fast_teacher, tokenizer, train_examples, folder, top_k=TEACHER_TOP_K,
                        vocab_size=head_rows(base), progress=False, logprob_dtype="float32")  # caches kept as before
        del fast_teacher
        config.teacher_cache, config.teacher_tail = str(folder), TEACHER_TAIL
        cache_info = {"top_k": TEACHER_TOP_K, "tail": TEACHER_TAIL, "seconds": time.perf_counter() - t0,
                      "on_trunk": on_trunk}
    # the Trainer prints every log dict to stdout; the lab shows one progress display instead (the
    # per-step metrics are kept in the history and in output_dir/metrics.jsonl)
    ref = (base if ref_model is None else ref_model) if "ref" in needs else None
    views = [TopOnly(m, trunk, split) for m in ([model] if ref is None else [model, ref])] if use_trunk else []

    def checkpoint(step: int) -> None:
        with contextlib.ExitStack() as full:
            for view in views:
                full.enter_context(view.suspended())
            on_checkpoint(step, model)

    callback = StepCallback(on_step, checkpoints, checkpoint if on_checkpoint else None)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.ExitStack() as stack:
        stack.enter_context(compute_context(settings.precision, model))
        stack.enter_context(bf16_head(model, settings.precision))
        for view in views:
            stack.enter_context(view)
        result = train(config, model=model, tokenizer=tokenizer, train_dataset=ExampleDataset(train_examples),
                       ref=ref, callbacks=[callback], save_final=False)
    seconds = time.perf_counter() - t0
    freeze(model)
    if result.global_step != config.max_steps:
        raise RuntimeError(f"{objective}: trained {result.global_step} steps, expected {config.max_steps}")
    info = {"history": result.history, "seconds": seconds, "params": params, "steps": result.global_step,
            "psft_refreshes": getattr(result.trainer, "psft_refreshes", None), "teacher_cache": cache_info}
    del result
    return model, info
