"""Run a teacher over tokenised rows once and store its top-k distribution at every supervised token.

Batched, with a progress bar, resumable (a shard file that exists is complete and is skipped) and
data-parallel without communication: with `world_size` processes, process `rank` builds the shards
j with j % world_size == rank. A shard's rows and batches do not depend on the process count, so one
process and several give the same files, and a resumed build the same as an uninterrupted one.
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

from qtarget.data.collate import Collator
from qtarget.ops.sparse_teacher import TeacherTopK, topk_from_logits
from qtarget.teacher_cache.manifest import Manifest, SplitInfo, describe, teacher_identity
from qtarget.teacher_cache.schema import (
    IGNORE_INDEX,
    LOGPROB_DTYPES,
    data_fingerprint,
    id_dtype,
    row_fingerprint,
    supervised_positions,
    tokenizer_fingerprint,
)
from qtarget.teacher_cache.storage import open_shard, shard_path, write_shard
from qtarget.training.patch import aux_hidden_and_head

LOGITS_BYTES = 1 << 28  # float32 teacher logits formed at once: 256 MiB


def _split_info(examples: Sequence[Mapping[str, Any]]) -> SplitInfo:
    fps = [row_fingerprint(ex) for ex in examples]
    n_sup = sum(len(supervised_positions(ex["labels"])) for ex in examples)
    return SplitInfo(rows=len(examples), supervised_tokens=n_sup, data_fingerprint=data_fingerprint(fps))


def make_manifest(teacher: nn.Module, tokenizer, splits: Mapping[str, Sequence[Mapping[str, Any]]], *, top_k: int,
                  temperature: float, vocab_size: int, rows_per_shard: int, logprob_dtype: str,
                  settings: Mapping[str, Any] | None = None, teacher_name: str | None = None,
                  student: str | None = None) -> Manifest:
    return Manifest(
        teacher=teacher_identity(teacher, teacher_name), tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        vocab_size=int(vocab_size), top_k=int(top_k), temperature=float(temperature), logprob_dtype=logprob_dtype,
        rows_per_shard=int(rows_per_shard), splits={name: _split_info(rows) for name, rows in splits.items()},
        settings=dict(settings or {}), student=student)


@torch.no_grad()
def teacher_topk_rows(teacher: nn.Module, batch: dict[str, Tensor], *, top_k: int, temperature: float,
                      vocab_size: int) -> tuple[Tensor, TeacherTopK]:
    """The teacher's top-k at the supervised positions of one collated batch, in row-major order:
    (positions [n, 2] = (row, t) with labels[row, t] != -100, t >= 1;  TeacherTopK with [n, k], [n])."""
    hidden, head = aux_hidden_and_head(teacher, batch, vocab_size)  # [B, T, H]; rows past the student's V dropped
    mask = batch["labels"][:, 1:] != IGNORE_INDEX
    where = mask.nonzero()
    where[:, 1] += 1
    h = hidden[:, :-1][mask]  # [n, H]: the prefix up to t - 1 predicts labels[t]
    chunk = max(1, LOGITS_BYTES // (4 * vocab_size))
    parts = [topk_from_logits(head.logits(h[i:i + chunk]), top_k, temperature)
             for i in range(0, h.shape[0], chunk)]
    if not parts:
        empty = torch.empty(0, top_k, device=h.device)
        return where, TeacherTopK(empty.long(), empty, empty[:, 0])
    return where, TeacherTopK(torch.cat([p.ids for p in parts]), torch.cat([p.logprobs for p in parts]),
                              torch.cat([p.log_tail for p in parts]))


def _shard_tensors(teacher, collator, rows: Sequence[Mapping[str, Any]], start: int, *, batch_size: int,
                   top_k: int, temperature: float, vocab_size: int, logprob_dtype: torch.dtype, device,
                   bar) -> dict[str, Tensor]:
    positions, ids, logprobs, log_tail, counts = [], [], [], [], []
    for b0 in range(0, len(rows), batch_size):
        chunk = rows[b0:b0 + batch_size]
        batch = {k: v.to(device) for k, v in collator(chunk).items()}
        where, topk = teacher_topk_rows(teacher, batch, top_k=top_k, temperature=temperature, vocab_size=vocab_size)
        where = where.cpu()
        counts += torch.bincount(where[:, 0], minlength=len(chunk)).tolist()
        positions.append(where[:, 1].to(torch.int32))
        ids.append(topk.ids.cpu().to(id_dtype(vocab_size)))
        logprobs.append(topk.logprobs.cpu().to(logprob_dtype))
        log_tail.append(topk.log_tail.cpu().to(torch.float32))
        bar.update(len(chunk))
    offsets = torch.zeros(len(rows) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.tensor(counts, dtype=torch.int64), 0)
    return {"row_index": torch.arange(start, start + len(rows), dtype=torch.int64),
            "row_fingerprint": torch.tensor([row_fingerprint(r) for r in rows], dtype=torch.int64),
            "row_offsets": offsets, "positions": torch.cat(positions), "ids": torch.cat(ids),
            "logprobs": torch.cat(logprobs), "log_tail": torch.cat(log_tail)}


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
    teacher: nn.Module,
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
    logprob_dtype: str = "float32",
    rank: int | None = None,
    world_size: int | None = None,
    progress: bool = True,
) -> Manifest:
    """Cache `teacher`'s top-k distribution at every supervised token of `examples` (tokenised rows:
    dicts with input_ids and labels, e.g. `prepare_data(...).train`; `eval_examples` become the
    "eval" split) in `output_dir`. Returns the manifest.

    vocab_size: the student's vocabulary (its LM-head rows; default len(tokenizer)); the teacher's
      head rows beyond it are dropped (missing ones get probability 0) and pi_T is normalised over
      [0, vocab_size).
    settings: the tokenisation settings that produced the rows (recorded in the manifest).
    rank / world_size: this process's share (default: torch.distributed, else RANK / WORLD_SIZE).
    A re-run with the same arguments skips the shards that exist; one with other arguments raises,
    naming the manifest keys that differ.
    """
    if not len(examples):
        raise ValueError("no examples to cache")
    if logprob_dtype not in LOGPROB_DTYPES:
        raise ValueError(f"logprob_dtype must be one of {', '.join(LOGPROB_DTYPES)}, got {logprob_dtype!r}")
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

    splits = {"train": list(examples)}
    if eval_examples is not None and len(eval_examples):
        splits["eval"] = list(eval_examples)
    manifest = make_manifest(teacher, tokenizer, splits, top_k=top_k, temperature=temperature, vocab_size=vocab_size,
                             rows_per_shard=rows_per_shard, logprob_dtype=logprob_dtype, settings=settings,
                             teacher_name=teacher_name, student=student)
    root = Path(output_dir)
    try:
        existing = Manifest.load(root)
    except FileNotFoundError:
        existing = None
    if existing is not None:
        diff = existing.differences(manifest)
        if diff:
            raise ValueError(f"{root} holds a teacher cache built with other settings ({describe(diff, 'it', 'this run')}): "
                             f"use another --output_dir, or delete that folder to rebuild")
    else:
        manifest.save(root)  # every process writes the same bytes atomically
    digest = manifest.digest()

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collator = Collator(pad)
    device = next(teacher.parameters()).device
    was_training = teacher.training
    teacher.eval()
    todo, done_rows, total_rows = [], 0, 0
    for split, rows in splits.items():
        for shard in range(math.ceil(len(rows) / rows_per_shard)):
            if shard % world_size != rank:
                continue
            n = len(rows[shard * rows_per_shard:(shard + 1) * rows_per_shard])
            total_rows += n
            path = shard_path(root, split, shard)
            for stale in path.parent.glob(f".{path.name}.tmp-*"):
                stale.unlink(missing_ok=True)  # left by an interrupted build of this shard
            if path.exists():
                open_shard(path, split=split, shard=shard, manifest_digest=digest)  # raises if corrupted
                done_rows += n
            else:
                todo.append((split, shard))
    bar = tqdm(total=total_rows, initial=done_rows, desc=f"teacher cache (rank {rank}/{world_size})" if world_size > 1
               else "teacher cache", unit="row", disable=not progress)
    try:
        for split, shard in todo:
            rows = splits[split][shard * rows_per_shard:(shard + 1) * rows_per_shard]
            tensors = _shard_tensors(teacher, collator, rows, shard * rows_per_shard, batch_size=int(batch_size),
                                     top_k=int(top_k), temperature=float(temperature), vocab_size=vocab_size,
                                     logprob_dtype=LOGPROB_DTYPES[logprob_dtype], device=device, bar=bar)
            write_shard(root, split, shard, tensors, digest)
    finally:
        bar.close()
        teacher.train(was_training)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    return manifest
