"""What every teacher engine answers: the teacher's top-k log-probs at the supervised positions of
tokenised rows (token ids in, never text), with entry t = the teacher's distribution of token t
given the tokens before it.

Two kinds of engine:
- `hf`, which forms the logits itself and overrides `Engine.topk_rows`;
- engines that return *prompt log-probs* (vLLM, SGLang: a list over the prompt with None at
  position 0 and, at position t, a dict token -> log-prob holding the top-k and possibly the prompt
  token itself), which implement `prompt_topk` and inherit the conversion below.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from qtarget.teacher_cache.schema import supervised_positions

# (token id, log-prob, rank or None) for one position; None where the engine has no entry (t = 0)
Entry = list[tuple[int, float, "int | None"]] | None
Progress = Callable[[int], None]  # called with the number of tokens just finished


@dataclass
class PromptTopK:
    """An engine's answer for one prompt: the ids it says it read and, per position, its entries."""

    echoed: list[int]
    entries: list[Entry]


@dataclass
class TopKRows:
    """Top-k at the supervised positions of several rows, concatenated in row order."""

    counts: list[int]  # supervised tokens per row
    positions: Tensor  # [m] int64: position t in its row
    ids: Tensor  # [m, k] int64
    logprobs: Tensor  # [m, k] float
    log_tail: Tensor  # [m] float32


class Engine:
    """A teacher behind some interface. Subclasses set `name` and implement `prompt_topk` (or
    override `topk_rows`), `identity`, `describe` and `tokenize`."""

    name = "engine"

    def open(self) -> None:
        """Called once before the first request (connect, put a model in eval mode, ...)."""

    def close(self) -> None:
        """Called once after the build, also on errors."""

    def identity(self) -> dict[str, Any]:
        """The manifest's `teacher`: name, revision, weights (fingerprint, or None where unknown)."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """The manifest's `engine`: name, version, and the request settings that shape the numbers."""
        raise NotImplementedError

    def tokenize(self, text: str, add_special_tokens: bool) -> list[int] | None:
        """The engine's own tokenisation of `text`, or None where it cannot tell (checked by the preflight)."""
        return None

    def prompt_topk(self, prompts: Sequence[Sequence[int]], top_k: int, progress: Progress | None = None
                    ) -> list[PromptTopK]:
        raise NotImplementedError

    def check_rows(self, rows: Sequence[Mapping[str, Any]], top_k: int, temperature: float) -> None:
        """Refuse, before anything is written, rows or settings this engine cannot serve."""

    def topk_rows(self, rows: Sequence[Mapping[str, Any]], *, top_k: int, temperature: float, vocab_size: int,
                  progress: Progress | None = None, where: Callable[[int], str] = lambda i: f"row {i}") -> TopKRows:
        answers = self.prompt_topk([list(map(int, r["input_ids"])) for r in rows], top_k, progress)
        counts, positions, entries, names = [], [], [], []
        for i, (row, answer) in enumerate(zip(rows, answers)):
            sent = [int(t) for t in row["input_ids"]]
            check_echo(sent, answer, f"{self.name}: {where(i)}")
            pos = supervised_positions(row["labels"])
            counts.append(len(pos))
            positions += pos
            entries += [answer.entries[t] for t in pos]
            names += [(i, t) for t in pos]
        ids, logprobs = select_many(entries, top_k, vocab_size,
                                    lambda j: f"{self.name}: {where(names[j][0])} position {names[j][1]}")
        return TopKRows(counts, torch.tensor(positions, dtype=torch.int64), torch.from_numpy(ids),
                        torch.from_numpy(logprobs).to(torch.float32),
                        log_tail_of(torch.from_numpy(logprobs), top_k, vocab_size))


class EngineError(ValueError):
    """The engine answered, but not with what the cache needs (one line, not retried)."""


def check_echo(sent: Sequence[int], answer: PromptTopK, what: str) -> None:
    """The ids the engine read must be the ids sent: a BOS added or dropped shifts every entry."""
    echoed = list(answer.echoed)
    if echoed != list(sent):
        if len(echoed) == len(sent) + 1 and echoed[1:] == list(sent):
            change = f"adds token {echoed[0]} at the start of the prompt (a BOS)"
        elif len(echoed) + 1 == len(sent) and echoed == list(sent)[1:]:
            change = f"drops the first prompt token {sent[0]} (a BOS)"
        else:
            first = next((j for j, (a, b) in enumerate(zip(echoed, sent)) if a != b), min(len(echoed), len(sent)))
            change = f"read other ids than it was sent (first difference at position {first}; {len(echoed)} ids read, " \
                     f"{len(sent)} sent)"
        raise EngineError(f"{what}: the engine {change}; the cache needs entry t for exactly the ids sent: serve the "
                          f"model so that token-id prompts are used as given (no special tokens added)")
    if len(answer.entries) != len(sent):
        raise EngineError(f"{what}: the engine returned {len(answer.entries)} prompt log-prob entries for {len(sent)} "
                          f"prompt tokens")


def select_topk(entry: Entry, top_k: int, vocab_size: int, what: str, engine: str) -> tuple[list[int], list[float]]:
    """The k most probable of one position's entries (vLLM adds the prompt token with its rank when it is
    outside the top-k, so there may be k + 1): ids and log-probs, sorted by log-prob (then rank)."""
    what = f"{engine}: {what}" if engine else what
    if entry is None:
        raise EngineError(f"{what}: the engine returned no log-probs for a supervised position")
    ids = [e[0] for e in entry]
    if len(set(ids)) != len(ids):
        raise EngineError(f"{what}: the engine returned a token id twice")
    if len(entry) < top_k:
        raise EngineError(f"{what}: the engine returned {len(entry)} log-probs, fewer than top_k = {top_k}: "
                          f"the server caps them (vLLM: start it with --max-logprobs {top_k} or more) or lower --top_k")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise EngineError(f"{what}: the engine returned token id {bad[0]}, outside the student's vocabulary "
                          f"[0, {vocab_size}): the served model is not the student's tokenizer's")
    ranked = sorted(entry, key=lambda e: (-e[1], e[2] if e[2] is not None else 0, e[0]))[:top_k]
    return [e[0] for e in ranked], [e[1] for e in ranked]


def select_many(entries: Sequence[Entry], top_k: int, vocab_size: int, what: Callable[[int], str]
                ) -> tuple[np.ndarray, np.ndarray]:
    """`select_topk` over many positions at once (numpy; the client's cost per token matters when a server
    answers thousands of tokens a second): ids [m, k] int64 and log-probs [m, k] float64, in the same
    order as `select_topk`. Any position that breaks a rule is handed to `select_topk` for its message."""
    m = len(entries)
    if m == 0:
        return np.zeros((0, top_k), np.int64), np.zeros((0, top_k), np.float64)
    if any(e is None for e in entries):
        j = next(j for j, e in enumerate(entries) if e is None)
        select_topk(entries[j], top_k, vocab_size, what(j), "")
    widths = np.fromiter((len(e) for e in entries), np.int64, m)
    if int(widths.min()) < top_k:
        select_topk(entries[int(widths.argmin())], top_k, vocab_size, what(int(widths.argmin())), "")
    flat = [x for e in entries for x in e]
    n = len(flat)
    flat_ids = np.fromiter((x[0] for x in flat), np.int64, n)
    flat_lp = np.fromiter((x[1] for x in flat), np.float64, n)
    flat_rank = np.fromiter((0 if x[2] is None else x[2] for x in flat), np.int64, n)
    W = int(widths.max())
    row = np.repeat(np.arange(m), widths)
    col = np.arange(n) - np.repeat(np.cumsum(widths) - widths, widths)
    ids = np.broadcast_to(-2 - np.arange(W), (m, W)).copy()  # padding: distinct negative ids
    lp = np.full((m, W), -np.inf)
    rank = np.full((m, W), np.iinfo(np.int64).max)
    ids[row, col], lp[row, col], rank[row, col] = flat_ids, flat_lp, flat_rank
    bad = (flat_ids < 0) | (flat_ids >= vocab_size)
    ordered = np.sort(ids, axis=1)
    duplicate = (ordered[:, 1:] == ordered[:, :-1]).any(axis=1)
    if bad.any() or duplicate.any():
        j = int(row[bad.argmax()]) if bad.any() else int(duplicate.argmax())
        select_topk(entries[j], top_k, vocab_size, what(j), "")
    order = np.lexsort((ids, rank, -lp), axis=-1)[:, :top_k]  # by log-prob, then rank, then id
    return np.take_along_axis(ids, order, 1), np.take_along_axis(lp, order, 1)


def log_tail_of(logprobs: Tensor, top_k: int, vocab_size: int) -> Tensor:
    """log(1 - sum_k pi) per row, in float64 (-inf when the top-k hold all the mass, or k = V)."""
    lp = logprobs.to(torch.float64)
    mass = lp.exp().sum(-1)
    tail = torch.where(mass < 1, torch.log1p(-mass.clamp(max=1.0)), torch.full_like(mass, -math.inf))
    if top_k >= vocab_size:
        tail = torch.full_like(mass, -math.inf)
    return tail.to(torch.float32)
