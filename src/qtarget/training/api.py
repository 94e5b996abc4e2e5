"""`train()`: the Python entry point behind `qtarget train`, reusable with already-loaded models."""
from __future__ import annotations

import copy
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from peft import LoraConfig, get_peft_model
from torch import nn

from qtarget.cli_args import check_output_path
from qtarget.data import Collator, PreparedData, TokenizeReport, prepare_data
from qtarget.models.load import (
    check_source,
    freeze,
    load_aux_model,
    load_model,
    load_tokenizer,
    model_position_limit,
    torch_dtype,
)
from qtarget.models.lora import lora_target_argument, resolve_targets
from qtarget.ops.workspace import release_idle_workspaces
from qtarget.teacher_cache.manifest import Manifest
from qtarget.teacher_cache.reader import TeacherCache
from qtarget.teacher_cache.training import attach_teacher_cache, data_settings
from qtarget.training.config import QTargetConfig
from qtarget.training.logs import MetricsWriter
from qtarget.training.run_dir import check_output_dir, claim_output_dir, resume_checkpoint, run_fingerprint
from qtarget.training.trainer import STAGING_DIR, QTargetTrainer


@dataclass
class TrainResult:
    """history: one dict per logged train step (loss, nll, p_y, entropy, gamma, ... , step);
    eval_history: one dict per evaluation; final_dir: where the final model (or adapter) is."""

    history: list[dict[str, Any]]
    eval_history: list[dict[str, Any]]
    output_dir: Path
    final_dir: Path | None
    data_report: TokenizeReport | None
    trainer: QTargetTrainer = field(repr=False)
    global_step: int = 0


def check_requirements(config: QTargetConfig, *, teacher_given: bool = False) -> None:
    """Everything that can be checked before a model loads, including settings that would be ignored."""
    check_output_path(config.output_dir)
    needs = config.objective_needs
    if "teacher" in needs and not teacher_given and not config.teacher_model and not config.teacher_cache:
        raise ValueError(f"objective {config.objective!r} needs a teacher model (--teacher_model) or a teacher "
                         f"cache (--teacher_cache)")
    if teacher_given and config.teacher_cache:
        raise ValueError("pass either teacher= or config.teacher_cache (--teacher_cache), not both")
    for key, need, role in (("teacher_model", "teacher", "teacher"), ("teacher_cache", "teacher", "teacher"),
                            ("ref_model", "ref", "reference model")):
        if getattr(config, key) and need not in needs:
            raise ValueError(f"--{key} would be ignored: objective {config.objective!r} uses no {role}; drop --{key} "
                             f"or choose an objective that uses one")
    if config.teacher_cache:
        TeacherCache(config.teacher_cache, verify=False)  # a missing manifest or shard, before any model loads
        if config.teacher_model:
            check_teacher_matches_cache(config.teacher_model, config.teacher_cache)
    for name, role in ((config.model, "student"), (config.teacher_model, "teacher"), (config.ref_model, "ref")):
        check_source(name, role)
    resume_checkpoint(config)  # --resume names a checkpoint that exists


def check_teacher_matches_cache(teacher_model: str, teacher_cache: str) -> None:
    """--teacher_model next to --teacher_cache must name the teacher the cache was built from (its manifest):
    the cache is what trains, so another teacher there would be silently ignored (and recorded)."""
    cached = str(Manifest.load(Path(teacher_cache)).teacher.get("name"))
    if cached == teacher_model or (Path(cached).exists() and Path(teacher_model).exists()
                                   and Path(cached).resolve() == Path(teacher_model).resolve()):
        return
    raise ValueError(f"--teacher_model {teacher_model!r} is not the teacher of --teacher_cache {teacher_cache!r} (its "
                     f"manifest records {cached!r}); training reads the cache, so drop --teacher_model or pass the "
                     f"cache's teacher")


def _is_tokenized(ds: Any) -> bool:
    try:
        return len(ds) > 0 and isinstance(ds[0], dict) and "input_ids" in ds[0] and "labels" in ds[0]
    except Exception:  # noqa: BLE001 - anything not indexable is raw
        return False


def apply_lora(model: nn.Module, config: QTargetConfig) -> nn.Module:
    """Wrap `model` in a LoRA adapter whose initial weights depend on `config.seed` only: the adapter is
    drawn from a forked RNG seeded with it (the Trainer seeds the global RNG later, too late for this)."""
    lora = LoraConfig(r=int(config.lora_r), lora_alpha=float(config.lora_alpha), lora_dropout=float(config.lora_dropout),
                      target_modules=lora_target_argument(list(config.lora_target_modules)), task_type="CAUSAL_LM")
    devices = sorted({p.device.index for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(config.seed))
        return get_peft_model(model, lora)


def fit_max_length(config: QTargetConfig, models: list[tuple[Any, str]]) -> None:
    """Clamp config.max_length (with a warning) to the shortest position limit of the models that read
    the training sequences (config max_position_embeddings / n_positions), so a long row is cut at the
    door instead of failing inside the model at some later step."""
    limits = [(limit, role) for model, role in models
              if (limit := model_position_limit(model, role) if model is not None else None) is not None]
    if not limits:
        return
    limit, role = min(limits, key=lambda x: x[0])
    if config.max_length is None or int(config.max_length) > limit:
        warnings.warn(f"--max_length {config.max_length} is beyond the {role} model's position limit ({limit}, its "
                      f"config's max_position_embeddings / n_positions): using --max_length {limit}", stacklevel=3)
        config.max_length = limit


def check_lengths(examples: Any, max_length: int | None, where: str) -> None:
    """Already-tokenised rows no longer than max_length (the models' position limit after fit_max_length)."""
    if examples is None or max_length is None or not hasattr(examples, "__len__"):
        return
    for i in range(len(examples)):
        n = len(examples[i]["input_ids"])
        if n > max_length:
            raise ValueError(f"{where} row {i} has {n} tokens, more than max_length {max_length} (the limit of "
                             f"the models' positions or --max_length): cut the rows or raise --max_length")


def save_yaml(config: QTargetConfig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(yaml.safe_dump(config.to_plain_dict(), sort_keys=True))
    os.replace(tmp, path)


def train(
    config: QTargetConfig,
    model: nn.Module | str | None = None,
    tokenizer=None,
    train_dataset: Any = None,
    eval_dataset: Any = None,
    teacher: nn.Module | str | None = None,
    ref: nn.Module | str | None = None,
    callbacks: list | None = None,
    save_final: bool = True,
) -> TrainResult:
    """Fine-tune with `config`. Everything not passed is loaded from the config:
    model / teacher / ref: a loaded `PreTrainedModel` or a hub id / folder (default: config.model,
      config.teacher_model, config.ref_model). The student is trained in place.
    tokenizer: default loaded from the model path.
    train_dataset / eval_dataset: raw rows (a path, hub name, list of dicts, datasets.Dataset) that are
      tokenised here, or already tokenised examples (dicts with input_ids and labels, e.g.
      `prepare_data(...).train`). Default: config.dataset / config.eval_dataset / eval_fraction.

    Returns the per-step metric history. Writes metrics.csv, metrics.jsonl, curves.png, config.yaml,
    checkpoints (config.save_steps) and the final model in `output_dir/final`.
    """
    check_requirements(config, teacher_given=teacher is not None)
    output_dir = Path(config.output_dir)
    model_name = model if isinstance(model, str) else config.model
    if model is None or isinstance(model, str):
        if not model_name:
            raise ValueError("no model: pass model= or set config.model (--model)")
    if train_dataset is None and not config.dataset:
        raise ValueError("no training data: pass train_dataset= or set config.dataset (--dataset)")

    if tokenizer is None:
        if not model_name:
            raise ValueError("pass tokenizer= when model is an already-loaded model and config.model is unset")
        tokenizer = load_tokenizer(model_name)
    elif tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")
        tokenizer.pad_token = tokenizer.eos_token

    needs = config.objective_needs
    readers = [(model if model is not None else model_name, "student")]  # the models that read the sequences
    if "teacher" in needs and not config.teacher_cache:
        readers.append((teacher if teacher is not None else config.teacher_model, "teacher"))
    if "ref" in needs:
        readers.append((ref if ref is not None else config.ref_model, "ref"))
    fit_max_length(config, readers)
    if config.use_lora:  # the targets the model has, in config.yaml and the run's fingerprint
        config.lora_target_modules = resolve_targets(model if model is not None else model_name,
                                                     config.lora_target_modules)
    report = None
    source = config.dataset if train_dataset is None else train_dataset
    if _is_tokenized(source):
        train_ds = source
        eval_ds = eval_dataset
        check_lengths(train_ds, config.max_length, "train_dataset")
        check_lengths(eval_ds, config.max_length, "eval_dataset")
    else:
        prepared: PreparedData = prepare_data(
            source, tokenizer, max_length=config.max_length, response_only=config.response_only,
            chat_template=config.chat_template, packing=config.packing, eval_fraction=config.eval_fraction,
            eval_source=eval_dataset if eval_dataset is not None else config.eval_dataset, seed=config.seed,
            split=config.dataset_split, dataset_config=config.dataset_config, max_rows=config.max_rows,
            strict_rows=config.strict_rows, prompt_loss_weight=config.prompt_loss_weight)
        train_ds, eval_ds, report = prepared.train, prepared.eval, prepared.report
        if config.process_index == 0:
            print(f"[qtarget] data: {report.summary()}" + "".join(f"; {n}" for n in report.notes))
    if eval_ds is not None and _is_tokenized(eval_ds) is False and len(eval_ds) > 0:
        raise ValueError("eval_dataset must be tokenised examples when train_dataset is (dicts with input_ids, labels)")

    checkpoint = resume_checkpoint(config)
    fingerprint = run_fingerprint(config, train_ds)
    check_output_dir(config, fingerprint, checkpoint)  # before any model loads

    needs = config.objective_needs
    if isinstance(model, str) or model is None:
        model = load_model(model_name, role="student", dtype=config.dtype)
    collator = Collator(tokenizer.pad_token_id)
    if config.teacher_cache:  # the teacher comes from the cache: none is loaded
        train_ds, eval_ds, collator = attach_teacher_cache(
            config.teacher_cache, tokenizer=tokenizer, student=model, train_dataset=train_ds, eval_dataset=eval_ds,
            settings=data_settings(config) if report is not None else None, verbose=config.process_index == 0)
    if "teacher" in needs and not config.teacher_cache:
        if teacher is None or isinstance(teacher, str):
            teacher = load_aux_model(teacher or config.teacher_model, role="teacher", student_tokenizer=tokenizer,
                                     student_name=str(model_name), dtype=config.aux_dtype("teacher"))
    else:
        teacher = None
    if config.use_lora:
        model = apply_lora(model, config)
    if "ref" in needs:
        if isinstance(ref, str) or (ref is None and config.ref_model):
            ref = load_aux_model(ref or config.ref_model, role="reference", student_tokenizer=tokenizer,
                                 student_name=str(model_name), dtype=config.aux_dtype("ref"))
        elif ref is None and config.ref_dtype not in (None, "auto") and not config.use_lora:  # frozen initial student
            ref = freeze(copy.deepcopy(model)).to(torch_dtype(config.ref_dtype))
    else:
        ref = None

    writer = MetricsWriter(output_dir, plot=config.plot)
    trainer = QTargetTrainer(
        model=model, args=config, teacher=teacher, ref=ref, train_dataset=train_ds, eval_dataset=eval_ds,
        processing_class=tokenizer, data_collator=collator,
        callbacks=[writer] + list(callbacks or []),
    )
    trainer.run_fingerprint = fingerprint  # copied into every checkpoint
    if config.process_index == 0:  # set-up succeeded: only now does output_dir look like a run
        claim_output_dir(config, fingerprint, checkpoint)
        save_yaml(config, output_dir / "config.yaml")
        if not checkpoint:
            for name in ("metrics.jsonl", "metrics.csv"):
                (output_dir / name).unlink(missing_ok=True)
    try:
        trainer.train(resume_from_checkpoint=checkpoint)
    finally:
        release_idle_workspaces()  # the engine's buffers kept between steps (CPU): training is over

    final_dir = None
    if save_final:
        final_dir = output_dir / "final"
        save_final_model(trainer, final_dir)
    return TrainResult(history=writer.train_rows, eval_history=writer.eval_rows, output_dir=output_dir,
                       final_dir=final_dir, data_report=report, trainer=trainer,
                       global_step=trainer.state.global_step)


def save_final_model(trainer: QTargetTrainer, final_dir: Path) -> None:
    """Model (or LoRA adapter) + tokenizer in safetensors, written to a staging folder then renamed."""

    staging = final_dir.parent / STAGING_DIR / final_dir.name
    if trainer.args.should_save:
        shutil.rmtree(staging, ignore_errors=True)
    trainer.save_model(str(staging))
    trainer.accelerator.wait_for_everyone()
    if trainer.args.should_save:
        if final_dir.exists():
            shutil.rmtree(final_dir)
        os.replace(staging, final_dir)
        shutil.rmtree(staging.parent, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
