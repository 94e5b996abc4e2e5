"""Training from a teacher cache: open it, check it fits the run (tokenizer, student vocabulary,
the exact tokenised rows), and give the Collator what it needs to put the cached teacher in batches."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from qtarget.data.collate import CacheRows, Collator
from qtarget.teacher_cache.manifest import DATA_KEYS
from qtarget.teacher_cache.reader import TeacherCache
from qtarget.models.head import head_rows


def data_settings(config: Any) -> dict[str, Any]:
    """The tokenisation keys (DATA_KEYS) of a QTargetConfig (or any object with those attributes)."""
    return {k: getattr(config, k, None) for k in DATA_KEYS}


def open_for_training(folder: str, *, tokenizer, student: nn.Module, train_examples: Sequence[Mapping[str, Any]],
                      eval_examples: Sequence[Mapping[str, Any]] | None = None,
                      settings: Mapping[str, Any] | None = None, verify: bool = True) -> TeacherCache:
    """A validated TeacherCache for this run, or a ValueError / MissingRowError naming what differs:
    the tokenizer, the student's vocabulary size, the rows of the train (and eval) split."""
    cache = TeacherCache(folder, verify=verify)
    cache.check_tokenizer(tokenizer)
    cache.check_vocab_size(head_rows(student))
    cache.check_rows("train", train_examples, settings)
    if eval_examples is not None and len(eval_examples):
        cache.check_rows("eval", eval_examples, settings)
    return cache


def attach_teacher_cache(folder: str, *, tokenizer, student: nn.Module, train_dataset: Sequence, eval_dataset=None,
                         settings: Mapping[str, Any] | None = None,
                         verbose: bool = False) -> tuple[CacheRows, CacheRows | None, Collator]:
    """(train rows, eval rows, collator) for training from the cache at `folder`: the datasets' items
    carry their cache row, and the collator adds teacher_topk_ids / _logprobs / _log_tail to batches.
    verbose: print which teacher the cache holds (no teacher model is loaded)."""
    cache = open_for_training(folder, tokenizer=tokenizer, student=student, train_examples=train_dataset,
                              eval_examples=eval_dataset, settings=settings)
    if verbose:
        print(f"[qtarget] {cache.describe()} (no teacher model loaded)")
    train_rows = CacheRows(train_dataset, "train")
    eval_rows = CacheRows(eval_dataset, "eval") if eval_dataset is not None and len(eval_dataset) else None
    return train_rows, eval_rows, Collator(tokenizer.pad_token_id, teacher_cache=cache)
