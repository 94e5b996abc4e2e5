"""Run a teacher over tokenised rows once and store its top-k distribution at every supervised token.

The teacher is an engine (engines/: a model in this process, vLLM in this process, or vLLM / SGLang
servers); this module is the one writer they share. Batched, with a progress bar in tokens/s,
resumable (a shard file that exists is complete and is skipped) and data-parallel without
communication: with `world_size` processes, process `rank` builds the shards j with
j % world_size == rank. A shard's rows and batches do not depend on the process count, so one process
and several give the same files, and a resumed build the same as an uninterrupted one. Before the
first shard, a preflight (engines/preflight.py) refuses a teacher that does not fit the student.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from qtarget.teacher_cache.engines import Engine, EndpointsDown, HFEngine, preflight, teacher_topk_rows
from qtarget.teacher_cache.manifest import Manifest, SplitInfo, describe, teacher_identity
from qtarget.teacher_cache.schema import (
    DEFAULT_ENCODING,
    ENCODINGS,
    LOGPROB_DTYPES,
    data_fingerprint,
    id_dtype,
    row_fingerprint,
    supervised_positions,
    tokenizer_fingerprint,
)
from qtarget.teacher_cache.storage import open_shard, shard_path, write_shard

__all__ = ["build_cache", "cache_folder", "make_manifest", "teacher_topk_rows"]


def _split_info(examples: Sequence[Mapping[str, Any]]) -> SplitInfo:
    fps = [row_fingerprint(ex) for ex in examples]
    n_sup = sum(len(supervised_positions(ex["labels"])) for ex in examples)
    return SplitInfo(rows=len(examples), supervised_tokens=n_sup, data_fingerprint=data_fingerprint(fps))


def make_manifest(teacher: nn.Module | Engine, tokenizer, splits: Mapping[str, Sequence[Mapping[str, Any]]], *,
                  top_k: int, temperature: float, vocab_size: int, rows_per_shard: int, logprob_dtype: str,
                  settings: Mapping[str, Any] | None = None, teacher_name: str | None = None,
                  student: str | None = None) -> Manifest:
    if isinstance(teacher, Engine):
        identity, engine = teacher.identity(), teacher.describe()
    else:
        identity, engine = teacher_identity(teacher, teacher_name), {}
    return Manifest(
        teacher=identity, tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        vocab_size=int(vocab_size), top_k=int(top_k), temperature=float(temperature), logprob_dtype=logprob_dtype,
        rows_per_shard=int(rows_per_shard), splits={name: _split_info(rows) for name, rows in splits.items()},
        settings=dict(settings or {}), student=student, engine=engine)


def _shard_tensors(engine: Engine, rows: Sequence[Mapping[str, Any]], start: int, *, top_k: int, temperature: float,
                   vocab_size: int, logprob_dtype: torch.dtype, bar, where) -> dict[str, Tensor]:
    got = engine.topk_rows(rows, top_k=top_k, temperature=temperature, vocab_size=vocab_size, progress=bar.update,
                           where=lambda i: where(start + i))
    offsets = torch.zeros(len(rows) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.tensor(got.counts, dtype=torch.int64), 0)
    return {"row_index": torch.arange(start, start + len(rows), dtype=torch.int64),
            "row_fingerprint": torch.tensor([row_fingerprint(r) for r in rows], dtype=torch.int64),
            "row_offsets": offsets, "positions": got.positions.to(torch.int32), "ids": got.ids.to(id_dtype(vocab_size)),
            "logprobs": got.logprobs.to(logprob_dtype), "log_tail": got.log_tail.to(torch.float32)}


def cache_folder(root: str | Path, teacher: nn.Module, examples: Sequence[Mapping[str, Any]], *, top_k: int,
                 temperature: float = 1.0) -> Path:
    """A folder under `root` named by the teacher's weights fingerprint, the rows' data fingerprint,
    k and the temperature: one cache per (teacher, data, k, T), reused by every run that matches."""
    fp = data_fingerprint(row_fingerprint(ex) for ex in examples)
    return Path(root) / f"{teacher_identity(teacher)['weights']}-{fp}-k{int(top_k)}-t{float(temperature):g}"


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def build_cache(
    teacher: nn.Module | Engine,
    tokenizer,
    examples: Sequence[Mapping[str, Any]],
    output_dir: str | Path,
    *,
    top_k: int = 64,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    eval_examples: Sequence[Mapping[str, Any]] | None = None,
    settings: Mapping[str, Any] | None = None,
    teacher_name: str | None = None,
    student: str | None = None,
    batch_size: int = 8,
    rows_per_shard: int = 512,
    logprob_dtype: str = DEFAULT_ENCODING,
    rank: int | None = None,
    world_size: int | None = None,
    progress: bool = True,
    resume: bool = False,
) -> Manifest:
    """Cache `teacher`'s top-k distribution at every supervised token of `examples` (tokenised rows:
    dicts with input_ids and labels, e.g. `prepare_data(...).train`; `eval_examples` become the
    "eval" split) in `output_dir`. Returns the manifest.

    teacher: a loaded model (run here, `batch_size` rows at a time) or an engine
      (`qtarget.teacher_cache.engines`: VLLMServer, SGLangServer, VLLMLocal, HFEngine).
    vocab_size: the student's vocabulary (its LM-head rows; default len(tokenizer)); the teacher's
      head rows beyond it are dropped (missing ones get probability 0) and pi_T is normalised over
      [0, vocab_size).
    settings: the tokenisation settings that produced the rows (recorded in the manifest).
    rank / world_size: this process's share (default: torch.distributed, else RANK / WORLD_SIZE).
    A re-run with the same arguments skips the shards that exist; one with other arguments raises,
    naming the manifest keys that differ. resume=True: the folder must hold a cache already.
    """
    if not len(examples):
        raise ValueError("no examples to cache")
    if logprob_dtype not in ENCODINGS:
        raise ValueError(f"logprob_dtype must be one of {', '.join(ENCODINGS)}, got {logprob_dtype!r}")
    if int(batch_size) < 1 or int(rows_per_shard) < 1:
        raise ValueError(f"batch_size and rows_per_shard must be >= 1, got {batch_size} and {rows_per_shard}")
    vocab_size = int(vocab_size or len(tokenizer))
    if not 1 <= int(top_k) <= vocab_size:
        raise ValueError(f"top_k must be in [1, {vocab_size}] (the vocabulary size), got {top_k}")
    if float(temperature) <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    d_rank, d_world = _dist_rank_world()
    rank = d_rank if rank is None else int(rank)
    world_size = d_world if world_size is None else int(world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    root = Path(output_dir)
    try:
        existing = Manifest.load(root)
    except FileNotFoundError:
        existing = None
    if resume and existing is None:
        raise ValueError(f"--resume: {root} holds no teacher cache to continue (no manifest.json); "
                         f"drop --resume to start one")

    splits = {"train": list(examples)}
    if eval_examples is not None and len(eval_examples):
        splits["eval"] = list(eval_examples)
    engine = teacher if isinstance(teacher, Engine) else HFEngine(teacher, tokenizer, batch_size=batch_size,
                                                                     teacher_name=teacher_name, vocab_size=vocab_size)
    engine.open()
    try:
        every_row = [row for rows in splits.values() for row in rows]
        preflight(engine, tokenizer, every_row, top_k=int(top_k), temperature=float(temperature),
                  vocab_size=vocab_size)
        manifest = make_manifest(engine, tokenizer, splits, top_k=top_k, temperature=temperature,
                                 vocab_size=vocab_size, rows_per_shard=rows_per_shard, logprob_dtype=logprob_dtype,
                                 settings=settings, student=student)
        if existing is not None:
            diff = existing.differences(manifest)
            if diff:
                raise ValueError(f"{root} holds a teacher cache built with other settings "
                                 f"({describe(diff, 'it', 'this run')}): use another --output_dir, or delete that "
                                 f"folder to rebuild")
        else:
            manifest.save(root)  # every process writes the same bytes atomically
        _build_shards(engine, splits, root, manifest, rank=rank, world_size=world_size, progress=progress)
    finally:
        engine.close()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    return manifest


def _build_shards(engine: Engine, splits: Mapping[str, list], root: Path, manifest: Manifest, *, rank: int,
                  world_size: int, progress: bool) -> None:
    """Write this process's missing shards; a progress bar counts the rows' tokens (tokens/s)."""
    R, digest = manifest.rows_per_shard, manifest.digest()
    todo, done_tokens, total_tokens, n_mine = [], 0, 0, 0
    for split, rows in splits.items():
        for shard in range(math.ceil(len(rows) / R)):
            if shard % world_size != rank:
                continue
            n_mine += 1
            tokens = sum(len(r["input_ids"]) for r in rows[shard * R:(shard + 1) * R])
            total_tokens += tokens
            path = shard_path(root, split, shard)
            for stale in path.parent.glob(f".{path.name}.tmp-*"):
                stale.unlink(missing_ok=True)  # left by an interrupted build of this shard
            if path.exists():
                open_shard(path, split=split, shard=shard, manifest_digest=digest)  # raises if corrupted
                done_tokens += tokens
            else:
                todo.append((split, shard))
    desc = f"teacher cache (rank {rank}/{world_size})" if world_size > 1 else "teacher cache"
    bar = tqdm(total=total_tokens, initial=done_tokens, desc=desc, unit="tok", unit_scale=True, disable=not progress)
    written = n_mine - len(todo)
    try:
        for split, shard in todo:
            rows = splits[split][shard * R:(shard + 1) * R]
            tensors = _shard_tensors(engine, rows, shard * R, top_k=manifest.top_k, temperature=manifest.temperature,
                                     vocab_size=manifest.vocab_size,
                                     logprob_dtype=LOGPROB_DTYPES.get(manifest.logprob_dtype, torch.float32), bar=bar,
                                     where=lambda i, split=split: f"{split} row {i}")
            write_shard(root, split, shard, tensors, digest, encoding=manifest.encoding)
            written += 1
    except EndpointsDown as e:
        raise EndpointsDown(f"{e}. {written} of this process's {n_mine} shards are complete in {root}: start the "
                            f"server(s) and re-run with the same arguments and --resume to continue") from None
    finally:
        bar.close()
