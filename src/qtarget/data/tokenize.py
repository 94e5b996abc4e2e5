"""Rows -> token ids and labels (unshifted: labels[t] = input_ids[t] where supervised, else -100).

Row formats (detected from the columns):
- `messages`: a list of {"role", "content"} turns; the tokenizer's chat template is applied and,
  with `response_only`, only the assistant turns are supervised.
- `prompt` + `response`: plain text concatenation `prompt + response + eos` (or, with
  `chat_template=True`, a user turn and an assistant turn through the chat template).
- `text`: every token supervised, `+ eos`.

An optional `token_weights` column gives per-token data weights: a number (every supervised token
of the row) or a list with one weight per supervised token of the row, in order.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

IGNORE_INDEX = -100
FORMATS = ("messages", "prompt_response", "text")


@dataclass
class TokenizeOptions:
    max_length: int | None = 1024
    response_only: bool = True
    chat_template: bool = False  # apply the chat template to prompt/response rows too
    add_eos: bool = True


@dataclass
class TokenizeReport:
    """What tokenisation did to the rows (counts over the whole dataset)."""

    rows: int = 0
    examples: int = 0
    truncated: int = 0
    dropped_no_supervised: int = 0
    supervised_tokens: int = 0
    tokens: int = 0
    format: str = ""
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{self.rows} rows ({self.format}) -> {self.examples} examples, {self.tokens} tokens "
                f"({self.supervised_tokens} supervised); {self.truncated} truncated to max_length, "
                f"{self.dropped_no_supervised} dropped with no supervised token left")


def detect_format(columns: Sequence[str]) -> str:
    """'messages', 'prompt_response' or 'text' from a dataset's column names."""
    cols = set(columns)
    if "messages" in cols:
        return "messages"
    if "prompt" in cols and "response" in cols:
        return "prompt_response"
    if "prompt" in cols or "response" in cols:
        missing = "response" if "prompt" in cols else "prompt"
        raise ValueError(f"dataset has a {'prompt' if missing == 'response' else 'response'!r} column but no "
                         f"{missing!r} column: prompt/response rows need both")
    if "text" in cols:
        return "text"
    raise ValueError(f"dataset columns {sorted(cols)} have none of the supported formats: a 'messages' column, "
                     f"'prompt' + 'response' columns, or a 'text' column")


def _ids(tokenizer, text: str, *, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _require(row: Mapping[str, Any], column: str, index: int, kind: type | tuple = str) -> Any:
    value = row.get(column)
    if value is None:
        raise ValueError(f"row {index}: missing value in column {column!r}")
    if not isinstance(value, kind):
        expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ValueError(f"row {index}: column {column!r} must be {expected}, got {type(value).__name__}")
    return value


def _chat_ids(tokenizer, messages: list, *, generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return _ids(tokenizer, text, special=False)


def _check_messages(messages: Any, index: int) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"row {index}: column 'messages' must be a non-empty list of {{'role', 'content'}} dicts")
    for j, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise ValueError(f"row {index}: messages[{j}] must be a dict with 'role' and 'content', got {m!r}")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"row {index}: 'messages' has no assistant turn to train on")
    return [dict(role=m["role"], content=m["content"]) for m in messages]


def _messages_example(tokenizer, messages: list[dict], index: int, response_only: bool) -> tuple[list[int], list[bool]]:
    """ids of the whole conversation and a mask of the assistant tokens. Each assistant span is
    located by tokenising the conversation up to it (with the generation prompt) and through it;
    both must be token prefixes of the whole conversation, otherwise the template is not
    prefix-stable and masking by prefix would be wrong."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("rows with 'messages' need a tokenizer with a chat template (tokenizer.chat_template is None)")
    full = _chat_ids(tokenizer, messages, generation_prompt=False)
    if not response_only:
        return full, [True] * len(full)
    mask = [False] * len(full)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = _chat_ids(tokenizer, messages[:i], generation_prompt=True) if i > 0 else []
        end = _chat_ids(tokenizer, messages[: i + 1], generation_prompt=False)
        for part, ids in (("up to", start), ("through", end)):
            if full[: len(ids)] != ids:
                raise ValueError(f"row {index}: the chat template is not prefix-stable: the conversation tokenised "
                                 f"{part} assistant turn {i} is not a prefix of the whole conversation, so the "
                                 f"prompt cannot be masked by prefix; use response_only=False or prompt/response rows")
        for t in range(len(start), len(end)):
            mask[t] = True
    return full, mask


def tokenize_row(tokenizer, row: Mapping[str, Any], fmt: str, options: TokenizeOptions, index: int = 0) -> dict | None:
    """One raw row -> {"input_ids", "labels"[, "token_weights"], "truncated"}; None if no supervised
    token is left after truncation."""
    eos = [tokenizer.eos_token_id] if options.add_eos and tokenizer.eos_token_id is not None else []
    if fmt == "messages":
        messages = _check_messages(row.get("messages"), index)
        ids, mask = _messages_example(tokenizer, messages, index, options.response_only)
    elif fmt == "prompt_response":
        prompt = _require(row, "prompt", index)
        response = _require(row, "response", index)
        if options.chat_template:
            msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
            ids, mask = _messages_example(tokenizer, msgs, index, options.response_only)
        else:
            p_ids = _ids(tokenizer, prompt, special=True)
            r_ids = _ids(tokenizer, response, special=False) + eos
            ids = p_ids + r_ids
            mask = [not options.response_only] * len(p_ids) + [True] * len(r_ids)
    elif fmt == "text":
        ids = _ids(tokenizer, _require(row, "text", index), special=True) + eos
        mask = [True] * len(ids)
    else:
        raise ValueError(f"unknown row format {fmt!r}; valid: {', '.join(FORMATS)}")

    weights = None
    if "token_weights" in row and row["token_weights"] is not None:
        weights = _expand_weights(row["token_weights"], sum(mask), index)

    truncated = options.max_length is not None and len(ids) > options.max_length
    if truncated:
        n_kept_supervised = sum(mask[: options.max_length])
        ids, mask = ids[: options.max_length], mask[: options.max_length]
        if weights is not None:
            weights = weights[:n_kept_supervised]
    if not any(mask[1:]):  # position 0 is never predicted
        return None
    out: dict[str, Any] = {
        "input_ids": ids,
        "labels": [t if m else IGNORE_INDEX for t, m in zip(ids, mask)],
        "truncated": truncated,
    }
    if weights is not None:
        full_w, it = [], iter(weights)
        for m in mask:
            full_w.append(float(next(it)) if m else 0.0)
        out["token_weights"] = full_w
    return out


def _expand_weights(value: Any, n_supervised: int, index: int) -> list[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float, list, tuple)):
        raise ValueError(f"row {index}: column 'token_weights' must be a number or a list of numbers, "
                         f"got {type(value).__name__}")
    if isinstance(value, (int, float)):
        return [float(value)] * n_supervised
    if len(value) != n_supervised:
        raise ValueError(f"row {index}: column 'token_weights' has {len(value)} values but the row has "
                         f"{n_supervised} supervised tokens (one weight per supervised token, eos included)")
    try:
        return [float(v) for v in value]
    except (TypeError, ValueError) as e:
        raise ValueError(f"row {index}: column 'token_weights' must hold numbers: {e}") from None


def tokenize_rows(tokenizer, rows, options: TokenizeOptions, *, fmt: str | None = None) -> tuple[list[dict], TokenizeReport]:
    """Tokenise every row of a `datasets.Dataset` (or list of dicts). Raises if none is left."""
    columns = list(rows.column_names) if hasattr(rows, "column_names") else sorted({k for r in rows for k in r})
    fmt = fmt or detect_format(columns)
    report = TokenizeReport(format=fmt)
    examples = []
    for i, row in enumerate(rows):
        report.rows += 1
        ex = tokenize_row(tokenizer, row, fmt, options, i)
        if ex is None:
            report.dropped_no_supervised += 1
            continue
        report.truncated += int(ex.pop("truncated"))
        report.tokens += len(ex["input_ids"])
        report.supervised_tokens += sum(1 for t in ex["labels"][1:] if t != IGNORE_INDEX)
        examples.append(ex)
    report.examples = len(examples)
    if not examples:
        raise ValueError(f"the dataset is empty after tokenisation and filtering: {report.summary()}"
                         + (" (raise max_length?)" if report.dropped_no_supervised else ""))
    return examples, report
