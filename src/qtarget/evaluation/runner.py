"""`evaluate(model, tokenizer, problems, ...)`: generate, check, score, and write results that resume.

Work plan: every (problem, sample_idx) pair, ordered by prompt length (longest first, stable) and cut into
batches of `batch_size`; batch b is sampled with seed `seed + b`, so a rerun of the same plan produces the
same batches. Output folder (when `output_dir` is given):
    samples.jsonl   one JSON record per sample, appended and flushed after every batch
    config.json     the generation settings; a rerun with other settings is refused
    summary.json    metrics per benchmark and overall (see `metrics.summarize`)
    summary.md      the same as a markdown table

Resume: records already in samples.jsonl for a (problem_id, sample_idx) of the plan are kept and not
generated again; a torn last line (killed mid-write) is dropped. Batches killed before their write are
regenerated whole with their own seed, so a resumed run equals an uninterrupted one. (If a file is cut
inside a batch by hand, only the missing samples are generated; for sampling they then come from a
different random stream than the uninterrupted run would have used.)
"""
from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from tqdm.auto import tqdm

from qtarget.evaluation.answers import Backend, check_answer, extract_answer, extract_choice
from qtarget.evaluation.benchmarks import Problem
from qtarget.evaluation.generation import Generator, HFGenerator
from qtarget.evaluation.metrics import markdown_table, summarize
from qtarget.evaluation.prompts import is_multiple_choice, prompt_ids, resolve_style
from qtarget.models.load import model_position_limit

__all__ = ["EvalResult", "evaluate", "read_records", "SAMPLES_FILE", "SUMMARY_FILE", "TABLE_FILE", "CONFIG_FILE"]

SAMPLES_FILE, SUMMARY_FILE, TABLE_FILE, CONFIG_FILE = "samples.jsonl", "summary.json", "summary.md", "config.json"
# settings that change what a sample is; a resumed run must match them
_RESUME_KEYS = ("temperature", "top_p", "max_new_tokens", "seed", "prompt_style", "instruction", "system_prompt",
                "batch_size", "model")


@dataclass
class EvalResult:
    """summary: {"benchmarks": {name: metrics}, "overall": metrics, "config": settings, "generated": n};
    records: one dict per sample in plan order; output_dir: where files were written (or None)."""

    summary: dict[str, Any]
    records: list[dict[str, Any]]
    output_dir: Path | None = None
    table: str = field(default="", repr=False)


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Valid records of a samples.jsonl; a torn (unparseable) last line is dropped, other bad lines raise."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break  # interrupted mid-write
            raise ValueError(f"{path}:{i + 1}: not valid JSON; the samples file is corrupt") from None
    return out


def _rewrite(path: Path, records: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".jsonl.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _model_name(model: Any) -> str | None:
    cfg = getattr(model, "config", None)
    name = getattr(cfg, "_name_or_path", None) or getattr(cfg, "name_or_path", None)
    return str(name) if name else None


def _grade(problem: Problem, response: str, backend: Backend) -> tuple[bool, str | None]:
    if is_multiple_choice(problem):
        return extract_choice(response) == problem.answer.strip(), extract_choice(response)
    return check_answer(response, problem.answer, backend=backend), extract_answer(response)


def fit_new_tokens(prompts: dict[str, list[int]], max_new_tokens: int, limit: int | None) -> int:
    """max_new_tokens, lowered (with a warning) so that the longest prompt plus its reply fits the model's
    `limit` positions (None: unknown, unchanged); a prompt that fills them is refused, naming the problem."""
    if limit is None or not prompts:
        return max_new_tokens
    longest = max(prompts, key=lambda k: len(prompts[k]))
    room = limit - len(prompts[longest])
    if room < 1:
        raise ValueError(f"problem {longest!r}: its prompt has {len(prompts[longest])} tokens, the model's position "
                         f"limit is {limit}; shorten it or leave it out of the dataset")
    if max_new_tokens > room:
        warnings.warn(f"--max_new_tokens {max_new_tokens} → {room}: the longest prompt (problem {longest!r}, "
                      f"{len(prompts[longest])} tokens) leaves {room} of the model's {limit} positions", stacklevel=3)
        return room
    return max_new_tokens


def evaluate(
    model: Any,
    tokenizer: Any,
    problems: Sequence[Problem],
    *,
    samples: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    max_new_tokens: int = 512,
    batch_size: int = 8,
    seed: int = 0,
    output_dir: str | Path | None = None,
    prompt_style: str = "auto",
    instruction: str | None = None,
    system_prompt: str | None = None,
    progress: bool = True,
    generator: Generator | None = None,
    ks: Sequence[int] | None = None,
    answer_backend: Backend = "auto",
    model_name: str | None = None,
    regrade: bool = False,
) -> EvalResult:
    """Evaluate a causal LM on `problems`: `samples` responses each, graded by `check_answer`.

    model: a Hugging Face causal LM (ignored when `generator` is given, e.g. a `VLLMGenerator`).
    temperature: 0 = greedy; `samples` > 1 with temperature 0 repeats the same greedy answer.
    output_dir: when set, samples.jsonl / summary.json / summary.md / config.json are written there and an
        earlier, interrupted run in that folder is resumed.
    regrade: re-check the responses already in samples.jsonl with the current `check_answer` (the file is
        rewritten with the new verdicts); useful after the checker changed.
    Returns an `EvalResult` whose summary has accuracy, avg@n, pass@k (k = 1, 2, 4, ... <= n), mean
    response tokens, cut rate (share of responses that hit `max_new_tokens`) and mean token entropy.
    """
    if not problems:
        raise ValueError("problems is empty; nothing to evaluate")
    if not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive integer, got {samples!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ids = [p.id for p in problems]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"problem ids must be unique; {dup!r} appears more than once")
    if generator is None:
        if model is None:
            raise ValueError("pass a model (Hugging Face causal LM) or a generator")
        generator = HFGenerator(model, tokenizer, batch_size=batch_size)

    style = resolve_style(tokenizer, prompt_style)
    # a problem read from a data file carries the tokens training puts before its reply (meta["prompt_ids"])
    prompt_cache = {
        p.id: list(p.meta["prompt_ids"]) if p.meta.get("prompt_ids") else
        prompt_ids(tokenizer, p, style=style, instruction=instruction, system_prompt=system_prompt)
        for p in problems
    }
    max_new_tokens = fit_new_tokens(prompt_cache, max_new_tokens, model_position_limit(model) if model is not None
                                    else None)
    config = {
        "model": model_name or _model_name(model), "temperature": float(temperature), "top_p": float(top_p),
        "max_new_tokens": int(max_new_tokens), "seed": int(seed), "prompt_style": style,
        "instruction": instruction, "system_prompt": system_prompt, "batch_size": int(batch_size),
        "samples": samples, "answer_backend": answer_backend,
    }

    # ---- resume state
    out_dir = Path(output_dir) if output_dir is not None else None
    existing: dict[tuple[str, int], dict[str, Any]] = {}
    samples_path = None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        samples_path = out_dir / SAMPLES_FILE
        cfg_path = out_dir / CONFIG_FILE
        if cfg_path.exists() and samples_path.exists():
            old = json.loads(cfg_path.read_text())
            diff = {k: (old.get(k), config[k]) for k in _RESUME_KEYS if old.get(k) != config[k]}
            if diff:
                raise ValueError(
                    f"{out_dir} holds a run with different settings {diff} (old, new); "
                    f"use another output_dir or delete {samples_path}"
                )
        records_on_disk = read_records(samples_path)
        if regrade:
            by_id = {p.id: p for p in problems}
            for r in records_on_disk:
                if r["problem_id"] in by_id:
                    r["correct"], r["extracted"] = _grade(by_id[r["problem_id"]], r["response"], answer_backend)
        _rewrite(samples_path, records_on_disk)  # drop a torn last line before appending
        for r in records_on_disk:
            existing[(r["problem_id"], int(r["sample_idx"]))] = r
        cfg_path.write_text(json.dumps(config, indent=2) + "\n")

    # ---- plan: (problem, sample_idx), longest prompt first, in fixed batches
    plan = [(p, s) for p in problems for s in range(samples)]
    order = sorted(range(len(plan)), key=lambda i: -len(prompt_cache[plan[i][0].id]))
    batches = [[plan[i] for i in order[b:b + batch_size]] for b in range(0, len(order), batch_size)]

    done = sum((p.id, s) in existing for p, s in plan)
    bar = None
    if progress:
        bar = tqdm(total=len(plan), initial=done, desc="eval", unit="sample", dynamic_ncols=True)
    generated = 0
    new_records: dict[tuple[str, int], dict[str, Any]] = {}
    fh = samples_path.open("a", encoding="utf-8") if samples_path is not None else None
    try:
        for b, batch in enumerate(batches):
            todo = [(p, s) for p, s in batch if (p.id, s) not in existing]
            if not todo:
                continue
            t0 = time.perf_counter()
            outs = generator.generate(
                [prompt_cache[p.id] for p, _ in todo], max_new_tokens=max_new_tokens,
                temperature=temperature, top_p=top_p, seed=seed + b,
            )
            seconds = time.perf_counter() - t0
            lines = []
            for (p, s), out in zip(todo, outs):
                correct, extracted = _grade(p, out.text, answer_backend)
                rec = {
                    "benchmark": p.source, "problem_id": p.id, "sample_idx": s, "question": p.question,
                    "gold": p.answer, "response": out.text, "extracted": extracted, "correct": bool(correct),
                    "num_tokens": out.num_tokens, "cut": bool(out.cut), "entropy": out.entropy,
                    "batch": b, "batch_seconds": round(seconds, 4),
                }
                new_records[(p.id, s)] = rec
                lines.append(json.dumps(rec, ensure_ascii=False) + "\n")
            if fh is not None:
                fh.writelines(lines)
                fh.flush()
                os.fsync(fh.fileno())
            generated += len(todo)
            if bar is not None:
                bar.update(len(todo))
                acc = [r["correct"] for r in new_records.values()]
                bar.set_postfix(acc=f"{sum(acc) / len(acc):.3f}")
    finally:
        if fh is not None:
            fh.close()
        if bar is not None:
            bar.close()

    records = [new_records.get((p.id, s)) or existing[(p.id, s)] for p, s in plan]
    summary = summarize(records, ks)
    summary["config"] = config
    summary["generated"] = generated
    table = markdown_table(summary)
    if out_dir is not None:
        (out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        (out_dir / TABLE_FILE).write_text(table)
    return EvalResult(summary=summary, records=records, output_dir=out_dir, table=table)
