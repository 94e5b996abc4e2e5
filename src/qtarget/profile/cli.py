"""`qtarget profile`: the prior profile of a model on a sample of your demonstrations, what it implies
for the choice of objective (with sources), and the `qtarget lab` command that tests it.

    qtarget profile --model smollm2 --dataset train.jsonl --limit 256 --output_dir profile_out
    qtarget profile --model M --dataset D --teacher T          # + teacher–student agreement
    qtarget profile --model M --dataset D --teacher_cache DIR  # the teacher from a teacher cache
"""
from __future__ import annotations

import argparse
import random
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from qtarget import cli
from qtarget.cli_args import add_bool_flag, check_number, check_output_path
from qtarget.data import load_rows, parse_chat_template, prepare_data
from qtarget.models.load import load_aux_model, load_model, load_tokenizer, model_position_limit, torch_dtype
from qtarget.models.head import head_rows
from qtarget.profile.advice import advise, lab_command
from qtarget.profile.compute import profile_examples
from qtarget.profile.lab_results import read_lab_results
from qtarget.profile.report import plot_histogram, terminal_report, write_json
from qtarget.profile.summary import summarize
from qtarget.teacher_cache.reader import TeacherCache
from qtarget.teacher_cache.schema import row_fingerprint

DEFAULT_LIMIT = 256
CACHE_DATA_KEYS = ("dataset_config", "dataset_split", "max_rows", "eval_fraction", "max_length", "response_only",
                   "chat_template", "seed")


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(
        prog="qtarget profile",
        description="One no-grad pass of a model over a sample of your demonstrations (the data path of "
                    "`qtarget train`): the distribution of p_y over supervised tokens, entropy, top-1 agreement, "
                    "per-position and per-row summaries and, with a teacher, where teacher and student disagree. "
                    "Places the profile on the model-capability continuum of arXiv 2510.00526 and lists the "
                    "objectives worth trying first, with sources, plus the `qtarget lab` command that tests them.")
    p.add_argument("--model", required=True, help="student: a folder, hub id or `smollm2`")
    p.add_argument("--dataset", required=True, help="a .jsonl/.json/.parquet/.csv file, a save_to_disk folder or a "
                                                    "hub dataset id (the formats of `qtarget train`)")
    teacher = p.add_mutually_exclusive_group()
    teacher.add_argument("--teacher", default=None, help="a teacher model on the student's vocabulary")
    teacher.add_argument("--teacher_cache", default=None, help="a teacher cache folder (`qtarget teacher-cache`); "
                                                                "its tokenisation settings are used")
    p.add_argument("--limit", type=int, default=DEFAULT_LIMIT,
                   help=f"rows to profile, drawn at random with --seed (default {DEFAULT_LIMIT}; 0 = all)")
    p.add_argument("--output_dir", default=None, help="write profile.json, profile.md and p_y_histogram.png here")
    p.add_argument("--lab_results", default=None, metavar="DIR",
                   help="the output folder of a `qtarget lab` run on this data: the advice then says which objective "
                        "won there, with its interval, and ranks by it")
    p.add_argument("--max_length", type=int, default=1024, help="truncate examples to this many tokens")
    p.add_argument("--chat_template", nargs="?", const="true", default=None, type=parse_chat_template,
                   metavar="auto|true|false", help="prompt/response rows through the chat template: auto (default) "
                                                   "decides per format as every command does (docs/data.md)")
    add_bool_flag(p, "all_tokens", help="supervise prompt tokens too (response_only=False)")
    p.add_argument("--dataset_split", default="train", help="split of a hub dataset / DatasetDict folder")
    p.add_argument("--dataset_config", default=None, help="hub dataset configuration name")
    p.add_argument("--batch_size", type=int, default=8, help="examples per forward pass")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, …")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    p.add_argument("--teacher_tail", default="student", help="with --teacher_cache: where the teacher's mass outside "
                                                             "its cached top-k goes (student, renormalize, uniform)")
    p.add_argument("--memory_budget_mb", type=float, default=None,
                   help="memory for one chunk of [rows, V] logits (default: $QTARGET_FUSED_BUDGET_MB or 1024)")
    p.add_argument("--seed", type=int, default=0, help="seed of the row sample")
    add_bool_flag(p, "no_progress", help="no progress bar")
    return p


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device: unknown device {name!r} (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


def sample_indices(n: int, limit: int, seed: int) -> list[int]:
    if limit < 0:
        raise ValueError(f"--limit must be >= 0 (0 = all rows), got {limit}")
    if limit == 0 or limit >= n:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), limit))


def _check_args(args: argparse.Namespace) -> None:
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.max_length is not None and args.max_length < 2:
        raise ValueError(f"--max_length must be >= 2, got {args.max_length}")
    check_number("memory_budget_mb", args.memory_budget_mb, 0, low_open=True)
    check_number("limit", args.limit, 0, integer=True)
    check_number("seed", args.seed, 0, integer=True)
    check_output_path(args.output_dir)
    torch_dtype(args.dtype)
    if args.teacher_cache and not Path(args.teacher_cache).is_dir():
        raise FileNotFoundError(f"--teacher_cache: no such folder {args.teacher_cache!r}")


def fit_max_length(args: argparse.Namespace) -> None:
    """--max_length no longer than the model's position limit (clamped with a warning), as `qtarget train` does."""
    limit = model_position_limit(args.model)
    if limit is not None and (args.max_length is None or args.max_length > limit):
        warnings.warn(f"--max_length {args.max_length} is beyond the model's position limit ({limit}, its config's "
                      f"max_position_embeddings / n_positions): using --max_length {limit}", stacklevel=2)
        args.max_length = limit


def load_sample(args: argparse.Namespace, tokenizer) -> tuple[list[dict], list[int] | None, Any, str, list[int] | None]:
    """(examples, cache rows or None, teacher cache or None, data summary line, the dataset row of each
    example or None when tokenisation dropped rows so that the mapping is unknown)."""
    if args.teacher_cache:
        cache = TeacherCache(args.teacher_cache)
        cache.check_tokenizer(tokenizer)
        settings = {k: v for k, v in cache.manifest.settings.items() if k in CACHE_DATA_KEYS and v is not None}
        prepared = prepare_data(args.dataset, tokenizer, packing=False,
                                split=settings.pop("dataset_split", "train"), **settings)
        train = prepared.train
        rows = sample_indices(len(train), args.limit, args.seed)
        examples = [train[i] for i in rows]
        cached = cache.fingerprints("train")
        if len(cached) != len(train):
            raise ValueError(f"--teacher_cache {args.teacher_cache} was built for other data: its 'train' split has "
                             f"{len(cached)} rows, {args.dataset} gives {len(train)} with the cache's settings")
        for i, ex in zip(rows, examples):
            if int(cached[i]) != row_fingerprint(ex):
                raise ValueError(f"--teacher_cache {args.teacher_cache} was built for other data: row {i} of its "
                                 f"'train' split differs from row {i} of {args.dataset}")
        # the train split is the dataset itself when nothing was held out or dropped
        report = prepared.report
        mapped = rows if not settings.get("eval_fraction") and report.examples == report.rows else None
        return examples, rows, cache, prepared.report.summary(), mapped
    rows_all = load_rows(args.dataset, split=args.dataset_split, name=args.dataset_config)
    picked = sample_indices(len(rows_all), args.limit, args.seed)
    if not picked:
        raise ValueError(f"dataset {args.dataset!r} has no rows")
    prepared = prepare_data(rows_all.select(picked), tokenizer, max_length=args.max_length,
                            response_only=not args.all_tokens, chat_template=args.chat_template, packing=False)
    examples = list(prepared.train)
    return examples, None, None, prepared.report.summary(), picked if len(examples) == len(picked) else None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _check_args(args)
    lab_outcome = read_lab_results(args.lab_results) if args.lab_results else None
    device = resolve_device(args.device)
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(args.model)
    fit_max_length(args)
    examples, cache_rows, cache, data_line, dataset_rows = load_sample(args, tokenizer)
    model = load_model(args.model, role="base", dtype=args.dtype).to(device)
    teacher = None
    if args.teacher:
        teacher = load_aux_model(args.teacher, role="teacher", student_tokenizer=tokenizer, student_name=args.model,
                                 dtype=args.dtype).to(device)
    if cache is not None:
        cache.check_vocab_size(head_rows(model))
    print(f"[qtarget] profile data: {data_line}", file=sys.stderr)
    bar = tqdm(total=len(examples), desc="profile", unit="row", dynamic_ncols=True, disable=args.no_progress)
    budget = None if args.memory_budget_mb is None else int(args.memory_budget_mb * 2**20)
    try:
        profile = profile_examples(model, examples, pad_token_id=tokenizer.pad_token_id, teacher=teacher,
                                   teacher_cache=cache, cache_rows=cache_rows, teacher_tail=args.teacher_tail,
                                   batch_size=args.batch_size, memory_budget=budget, on_batch=bar.update)
    finally:
        bar.close()
    summary = summarize(profile, tokenizer, dataset_rows=dataset_rows)
    has_teacher = teacher is not None or cache is not None
    advice = advise(summary, has_teacher=has_teacher, lab_results=lab_outcome)
    cmd = lab_command(args.model, args.dataset, advice.lab_objectives, teacher=args.teacher,
                      objective_args=advice.lab_args)
    if args.teacher_cache and "target_sft" in advice.lab_objectives:
        advice.notes.append("the lab trains target_sft from a live teacher (it builds its own top-64 cache per run): "
                            "add --teacher MODEL to the command below to use the cached teacher's model, else the lab "
                            "trains one by SFT on a disjoint part of your data")
    text = terminal_report(summary, advice, cmd)
    print(text)
    if args.output_dir:
        out = Path(args.output_dir)
        record = {**summary, "advice": advice.to_dict(), "lab_command": cmd,
                  "model": args.model, "dataset": args.dataset, "teacher_model": args.teacher,
                  "teacher_cache": args.teacher_cache, "data": data_line,
                  "settings": {k: v for k, v in vars(args).items() if k not in ("no_progress",)},
                  "device": str(device), "seconds": round(time.perf_counter() - t0, 2)}
        write_json(record, out / "profile.json")
        (out / "profile.md").write_text(f"# qtarget profile\n\nmodel `{args.model}`, dataset `{args.dataset}`\n\n"
                                        f"{text}\n\n![p_y histogram](p_y_histogram.png)\n", encoding="utf-8")
        plot_histogram(summary, out / "p_y_histogram.png", title=f"{args.model} on {Path(args.dataset).name}")
        print(f"\nqtarget profile: wrote {out}/profile.json, profile.md and p_y_histogram.png", file=sys.stderr)
    return 0


if __name__ == "__main__":  # pragma: no cover - `python -m ...`: through the one CLI wrapper
    sys.exit(cli.main(["profile", *sys.argv[1:]]))
