"""Rows -> token ids and labels (unshifted: labels[t] = input_ids[t] where supervised, else -100).

Row formats are detected from the columns (`qtarget.data.formats`: messages, conversations (ShareGPT),
prompt + completion (TRL), prompt + response, Alpaca, text):
- conversations go through the tokenizer's chat template; with `response_only`, only the assistant
  turns (or a TRL completion) are supervised, located by character spans (`qtarget.data.chat`);
- prompt/response pairs are `prompt + response + eos`, prompt and response tokenised apart, or a user
  turn and an assistant turn through the chat template: `chat_template` None (auto, the default) decides
  per format (`qtarget.data.reading`: Alpaca rows are templated when the tokenizer has a template, plain
  prompt/completion and prompt/response rows are not), True / False for every pair;
- `text`: every token supervised, `+ eos`.

A row that is well formed but cannot be tokenised with its reply masked (the template refuses it, is
not prefix-stable on it, ...) is skipped and counted in the report (the first such row is named);
with `strict_rows` it is an error naming the row.

An optional `token_weights` column gives per-token data weights: a number (every supervised token
of the row) or a list with one weight per supervised token of the row, in order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from qtarget.data.chat import UntokenizableRow, supervised_spans, tokenize_spans
from qtarget.data.formats import FORMATS, Conversation, PromptResponse, detect_format, normalize_row
from qtarget.data.reading import describe_reading, parse_chat_template, templates_pairs

IGNORE_INDEX = -100
__all__ = ["IGNORE_INDEX", "FORMATS", "TokenizeOptions", "TokenizeReport", "UntokenizableRow", "detect_format",
           "tokenize_row", "tokenize_rows"]


@dataclass
class TokenizeOptions:
    max_length: int | None = 1024
    response_only: bool = True
    chat_template: bool | None = None  # prompt/response rows through the chat template: None = per format
    add_eos: bool = True
    strict_rows: bool = False  # a row that cannot be tokenised is an error instead of skipped
    # > 0: the tokens outside the response (prompt, system, template) are supervised too, their loss
    # weighted by this (the response's by 1) in `loss_weights` (WIT, arXiv 2507.07817); 0 = masked
    prompt_loss_weight: float = 0.0

    def __post_init__(self) -> None:
        w = self.prompt_loss_weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0.0 <= float(w) < float("inf"):
            raise ValueError(f"--prompt_loss_weight must be a finite number >= 0, got {w!r}")
        if w and not self.response_only:
            raise ValueError("--prompt_loss_weight needs --response_only true (with response_only false every "
                             "token is already supervised at weight 1)")


@dataclass
class TokenizeReport:
    """What tokenisation did to the rows (counts over the whole dataset)."""

    rows: int = 0
    examples: int = 0
    truncated: int = 0
    dropped_no_supervised: int = 0
    skipped_untokenizable: int = 0
    first_skipped: str = ""  # the reason for the first skipped row (names the row)
    split_at_boundary: int = 0  # rows tokenised piece by piece because a token merged across a reply edge
    supervised_tokens: int = 0
    tokens: int = 0
    format: str = ""
    templated_rows: int = 0  # examples rendered through the tokenizer's chat template
    notes: list[str] = field(default_factory=list)

    @property
    def reading(self) -> str:
        """Which format and which template the rows were read with."""
        return describe_reading(self.format, self.templated_rows, self.examples)

    def summary(self) -> str:
        text = (f"{self.rows} rows ({self.reading}) -> {self.examples} examples, {self.tokens} tokens "
                f"({self.supervised_tokens} supervised); {self.truncated} truncated to max_length, "
                f"{self.dropped_no_supervised} dropped with no supervised token left")
        if self.skipped_untokenizable:
            text += (f", {self.skipped_untokenizable} skipped as untokenisable (first: {self.first_skipped}; "
                     f"strict_rows refuses them)")
        if self.split_at_boundary:
            text += f"; {self.split_at_boundary} rows tokenised apart at the prompt/response boundary"
        return text


def _ids(tokenizer, text: str, *, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _example_ids(tokenizer, row: Mapping[str, Any], fmt: str, options: TokenizeOptions, index: int
                 ) -> tuple[list[int], list[bool], bool, bool]:
    """(ids, supervised mask, split at the boundary, through the chat template) of one row."""
    templated = templates_pairs(fmt, parse_chat_template(options.chat_template), tokenizer)
    item = normalize_row(row, fmt, index, chat_template=templated)
    if isinstance(item, Conversation):
        text, spans = supervised_spans(tokenizer, item, index, response_only=options.response_only)
        return (*tokenize_spans(tokenizer, text, spans, index), True)
    eos = [tokenizer.eos_token_id] if options.add_eos and tokenizer.eos_token_id is not None else []
    if isinstance(item, PromptResponse):  # tokenised apart: no token crosses the boundary
        p_ids = _ids(tokenizer, item.prompt, special=True)
        r_ids = _ids(tokenizer, item.response, special=False) + eos
        return p_ids + r_ids, [not options.response_only] * len(p_ids) + [True] * len(r_ids), False, False
    ids = _ids(tokenizer, item.text, special=True) + eos
    return ids, [True] * len(ids), False, False


def tokenize_row(tokenizer, row: Mapping[str, Any], fmt: str, options: TokenizeOptions, index: int = 0) -> dict | None:
    """One raw row -> {"input_ids", "labels"[, "token_weights", "loss_weights"], "truncated", "split", "templated"}; None if no
    supervised token is left after truncation. Raises ValueError for a malformed row and
    UntokenizableRow (a ValueError) for a row whose reply cannot be masked."""
    ids, mask, split, templated = _example_ids(tokenizer, row, fmt, options, index)

    weights = None
    if "token_weights" in row and row["token_weights"] is not None:
        weights = _expand_weights(row["token_weights"], sum(mask), index)

    truncated = options.max_length is not None and len(ids) > options.max_length
    if truncated:
        n_kept_supervised = sum(mask[: options.max_length])
        ids, mask = ids[: options.max_length], mask[: options.max_length]
        if weights is not None:
            weights = weights[:n_kept_supervised]
    response = mask
    if options.prompt_loss_weight:  # every token supervised; the non-response ones at their own weight
        mask = [True] * len(ids)
    if not any(mask[1:]):  # position 0 is never predicted
        return None
    out: dict[str, Any] = {
        "input_ids": ids,
        "labels": [t if m else IGNORE_INDEX for t, m in zip(ids, mask)],
        "truncated": truncated,
        "split": split,
        "templated": templated,
    }
    if weights is not None:
        full_w, it = [], iter(weights)
        for m, r in zip(mask, response):
            full_w.append(float(next(it)) if r else 1.0 if m else 0.0)
        out["token_weights"] = full_w
    if options.prompt_loss_weight:
        out["loss_weights"] = [1.0 if r else float(options.prompt_loss_weight) for r in response]
    return out


def _expand_weights(value: Any, n_supervised: int, index: int) -> list[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float, list, tuple)):
        raise ValueError(f"row {index}: column 'token_weights' must be a number or a list of numbers, "
                         f"got {type(value).__name__}")
    if isinstance(value, (int, float)):
        return _finite_weights([float(value)], index) * n_supervised
    if len(value) != n_supervised:
        raise ValueError(f"row {index}: column 'token_weights' has {len(value)} values but the row has "
                         f"{n_supervised} supervised tokens (one weight per supervised token, eos included)")
    try:
        weights = [float(v) for v in value]
    except (TypeError, ValueError) as e:
        raise ValueError(f"row {index}: column 'token_weights' must hold numbers: {e}") from None
    return _finite_weights(weights, index)


def _finite_weights(weights: list[float], index: int) -> list[float]:
    """Token weights are finite and >= 0 (a NaN, inf or negative weight would train on garbage)."""
    for j, w in enumerate(weights):
        if not math.isfinite(w) or w < 0:
            where = f"value {j} is" if len(weights) > 1 else "the value is"
            raise ValueError(f"row {index}: column 'token_weights': {where} {w!r}; weights must be finite "
                             f"numbers >= 0")
    return weights


def tokenize_rows(tokenizer, rows, options: TokenizeOptions, *, fmt: str | None = None) -> tuple[list[dict], TokenizeReport]:
    """Tokenise every row of a `datasets.Dataset` (or list of dicts). Raises if none is left."""
    columns = list(rows.column_names) if hasattr(rows, "column_names") else sorted({k for r in rows for k in r})
    fmt = fmt or detect_format(columns)
    report = TokenizeReport(format=fmt)
    examples = []
    for i, row in enumerate(rows):
        report.rows += 1
        try:
            ex = tokenize_row(tokenizer, row, fmt, options, i)
        except UntokenizableRow as e:
            if options.strict_rows:
                raise ValueError(f"{e} [strict_rows]") from None
            report.skipped_untokenizable += 1
            report.first_skipped = report.first_skipped or str(e)
            continue
        if ex is None:
            report.dropped_no_supervised += 1
            continue
        report.templated_rows += int(ex.pop("templated"))
        report.truncated += int(ex.pop("truncated"))
        report.split_at_boundary += int(ex.pop("split"))
        report.tokens += len(ex["input_ids"])
        report.supervised_tokens += sum(1 for t in ex["labels"][1:] if t != IGNORE_INDEX)
        examples.append(ex)
    report.examples = len(examples)
    if not examples:
        hint = " (raise max_length?)" if report.dropped_no_supervised else ""
        raise ValueError(f"the dataset is empty after tokenisation and filtering: {report.summary()}{hint}")
    return examples, report
