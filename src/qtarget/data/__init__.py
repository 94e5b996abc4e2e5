"""Data for training: load rows (files, save_to_disk folders, hub names), tokenise them with
response-only labels, optionally pack, and hold out an eval split.

    prepared = prepare_data("train.jsonl", tokenizer, max_length=512, eval_fraction=0.1)
    prepared.train, prepared.eval      # ExampleDataset (torch map-style datasets of dicts)
    prepared.report.summary()          # rows, truncated rows, dropped rows, supervised tokens
    Collator(tokenizer.pad_token_id)   # batches: input_ids, labels, attention_mask | position_ids, token_weights
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch

from qtarget.data.collate import Collator, pack_examples
from qtarget.data.reading import parse_chat_template, prompt_prefix
from qtarget.data.sources import load_rows, write_jsonl
from qtarget.data.tokenize import (
    IGNORE_INDEX,
    TokenizeOptions,
    TokenizeReport,
    UntokenizableRow,
    detect_format,
    tokenize_row,
    tokenize_rows,
)

__all__ = ["load_rows", "write_jsonl", "prepare_data", "PreparedData", "ExampleDataset", "Collator",
           "pack_examples", "TokenizeOptions", "TokenizeReport", "tokenize_row", "tokenize_rows",
           "detect_format", "UntokenizableRow", "IGNORE_INDEX", "split_examples", "parse_chat_template",
           "prompt_prefix"]


class ExampleDataset(torch.utils.data.Dataset):
    """A list of tokenised examples (dicts of lists) as a map-style torch dataset."""

    def __init__(self, examples: list[dict[str, Any]]) -> None:
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.examples[i]


@dataclass
class PreparedData:
    train: ExampleDataset
    eval: ExampleDataset | None
    report: TokenizeReport


def split_examples(examples: list, eval_fraction: float, seed: int) -> tuple[list, list]:
    """Hold out round(eval_fraction * n) examples (at least 1 when eval_fraction > 0), chosen with `seed`."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    if eval_fraction == 0.0:
        return list(examples), []
    n_eval = max(1, int(round(eval_fraction * len(examples))))
    if n_eval >= len(examples):
        raise ValueError(f"eval_fraction={eval_fraction} leaves no training example out of {len(examples)}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    return ([ex for i, ex in enumerate(examples) if i not in held],
            [ex for i, ex in enumerate(examples) if i in held])


def prepare_data(
    source: Any,
    tokenizer,
    *,
    max_length: int | None = 1024,
    response_only: bool = True,
    chat_template: bool | str | None = None,
    packing: bool = False,
    eval_fraction: float = 0.0,
    eval_source: Any = None,
    seed: int = 42,
    split: str = "train",
    dataset_config: str | None = None,
    max_rows: int | None = None,
    strict_rows: bool = False,
    prompt_loss_weight: float = 0.0,
) -> PreparedData:
    """Load, tokenise, split and (optionally) pack a dataset. See `qtarget.data.tokenize` for formats and
    `qtarget.data.reading` for `chat_template` (None / "auto": decided per format, the default of every command).

    The eval split comes from `eval_source` when given, else `eval_fraction` of the rows. Packing is
    applied to each split separately."""
    rows = load_rows(source, split=split, name=dataset_config)
    if max_rows is not None:
        rows = rows.select(range(min(int(max_rows), len(rows))))
    if len(rows) == 0:
        raise ValueError(f"dataset {source!r} has no rows")
    options = TokenizeOptions(max_length=max_length, response_only=response_only,
                              chat_template=parse_chat_template(chat_template),
                              strict_rows=strict_rows, prompt_loss_weight=prompt_loss_weight)
    examples, report = tokenize_rows(tokenizer, rows, options)
    if eval_source is not None:
        train_ex = examples
        eval_ex, eval_report = tokenize_rows(tokenizer, load_rows(eval_source, split=split, name=dataset_config),
                                             options)
        report.notes.append(f"eval data: {eval_report.summary()}")
    else:
        train_ex, eval_ex = split_examples(examples, eval_fraction, seed)
    if packing:
        train_ex = pack_examples(train_ex, max_length)
        eval_ex = pack_examples(eval_ex, max_length) if eval_ex else []
        report.notes.append(f"packed into {len(train_ex)} rows of <= {max_length} tokens")
    return PreparedData(train=ExampleDataset(train_ex), eval=ExampleDataset(eval_ex) if eval_ex else None,
                        report=report)
