"""Batching tokenised examples: right padding, or packing several examples into one row.

Packing puts whole examples (never split) into rows of at most `max_length` tokens and gives each
example its own `position_ids` starting at 0, with no `attention_mask`: transformers (v5) then
builds a block-diagonal causal mask from the position ids (`masking_utils.find_packed_sequence_indices`),
so a token never attends to another example of the same row. The first token of every example is
unsupervised, exactly as in an unpacked row.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from qtarget.data.tokenize import IGNORE_INDEX


def pack_examples(examples: Sequence[dict], max_length: int) -> list[dict]:
    """Greedy in-order packing: examples are appended to the current row while it fits."""
    if max_length is None or max_length < 1:
        raise ValueError(f"packing needs a positive max_length, got {max_length}")
    rows: list[dict] = []
    current: dict[str, list] | None = None
    has_weights = any("token_weights" in ex for ex in examples)
    has_loss_weights = any("loss_weights" in ex for ex in examples)
    for ex in examples:
        n = len(ex["input_ids"])
        if current is None or len(current["input_ids"]) + n > max_length:
            current = {"input_ids": [], "labels": [], "position_ids": []}
            if has_weights:
                current["token_weights"] = []
            if has_loss_weights:
                current["loss_weights"] = []
            rows.append(current)
        current["input_ids"] += ex["input_ids"]
        labels = list(ex["labels"])
        labels[0] = IGNORE_INDEX  # never predicted from the previous example
        current["labels"] += labels
        current["position_ids"] += list(range(n))
        if has_weights:
            current["token_weights"] += list(ex.get("token_weights", [1.0] * n))
        if has_loss_weights:
            current["loss_weights"] += list(ex.get("loss_weights", [1.0] * n))
    return rows


CACHE_ROW = "teacher_cache_row"  # example key: the row's index in the teacher cache split
CACHE_SPLIT = "teacher_cache_split"  # example key: that split ("train" / "eval"); default "train"


class CacheRows(torch.utils.data.Dataset):
    """A dataset of tokenised examples whose items also carry their row index in a teacher cache
    split (CACHE_ROW, CACHE_SPLIT), for a Collator with `teacher_cache`."""

    def __init__(self, examples: Sequence[dict[str, Any]], split: str = "train") -> None:
        self.examples, self.split = examples, split

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**self.examples[i], CACHE_ROW: int(i), CACHE_SPLIT: self.split}


class Collator:
    """Pads a list of examples to the longest one (right padding).

    Returns input_ids [B, T], labels [B, T] (-100 on padding), token_weights and loss_weights [B, T]
    (each when any example has them) and either attention_mask [B, T] or, for packed rows, position_ids [B, T] (padding gets
    its own position run so it forms a separate, unsupervised segment).

    With `teacher_cache` (a `qtarget.teacher_cache.TeacherCache`), every example must carry its cache
    row (see CacheRows) and the batch also holds the cached teacher, aligned with the unshifted labels:
    teacher_topk_ids [B, T, k] int64, teacher_topk_logprobs [B, T, k] float32 and
    teacher_topk_log_tail [B, T] float32 (a valid filler at unsupervised positions).
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None, teacher_cache: Any = None) -> None:
        if pad_token_id is None:
            raise ValueError("the tokenizer has no pad token id: set tokenizer.pad_token")
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.teacher_cache = teacher_cache

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("cannot collate an empty batch")
        T = max(len(ex["input_ids"]) for ex in examples)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            T = (T + m - 1) // m * m
        packed = "position_ids" in examples[0]
        weights = any("token_weights" in ex for ex in examples)
        B = len(examples)
        ids = torch.full((B, T), self.pad_token_id, dtype=torch.long)
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        attn = torch.zeros((B, T), dtype=torch.long)
        pos = torch.zeros((B, T), dtype=torch.long)
        tw = torch.zeros((B, T), dtype=torch.float32) if weights else None
        lw = torch.zeros((B, T), dtype=torch.float32) if any("loss_weights" in ex for ex in examples) else None
        for b, ex in enumerate(examples):
            n = len(ex["input_ids"])
            ids[b, :n] = torch.as_tensor(ex["input_ids"], dtype=torch.long)
            labels[b, :n] = torch.as_tensor(ex["labels"], dtype=torch.long)
            attn[b, :n] = 1
            if packed:
                pos[b, :n] = torch.as_tensor(ex["position_ids"], dtype=torch.long)
                pos[b, n:] = torch.arange(T - n)
            if tw is not None:
                tw[b, :n] = torch.as_tensor(ex.get("token_weights", [1.0] * n), dtype=torch.float32)
            if lw is not None:
                lw[b, :n] = torch.as_tensor(ex.get("loss_weights", [1.0] * n), dtype=torch.float32)
        batch = {"input_ids": ids, "labels": labels}
        if packed:
            batch["position_ids"] = pos
        else:
            batch["attention_mask"] = attn
        if tw is not None:
            batch["token_weights"] = tw
        if lw is not None:
            batch["loss_weights"] = lw
        if self.teacher_cache is not None:
            batch.update(self._cached_teacher(examples, labels))
        return batch

    def _cached_teacher(self, examples: Sequence[dict[str, Any]], labels: torch.Tensor) -> dict[str, torch.Tensor]:
        rows, splits = [], []
        for b, ex in enumerate(examples):
            if CACHE_ROW not in ex:
                raise ValueError(f"batch example {b} has no {CACHE_ROW!r}: with a teacher cache, each example must "
                                 f"carry its cache row index (wrap the dataset in qtarget.data.collate.CacheRows)")
            rows.append(int(ex[CACHE_ROW]))
            splits.append(ex.get(CACHE_SPLIT, "train"))
        return self.teacher_cache.batch(splits, rows, labels)
