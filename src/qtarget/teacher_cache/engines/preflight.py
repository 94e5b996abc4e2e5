"""One preflight every engine passes before a shard is written, so a wrong teacher costs seconds, not
hours. Each check ends in a one-line error:

- the tokenizer: the engine tokenises a probe text (ordinary words, non-ASCII, tokens spread over the
  whole vocabulary and every special token) to the student's ids, with and without special tokens;
- the prompt: the shortest row's ids come back as sent (no BOS added or dropped) with one entry per token;
- k: every position returns at least k log-probs (vLLM's --max-logprobs cap);
- the vocabulary: every returned id lies in [0, V);
- the rows: temperature, packing and length fit the engine (`Engine.check_rows`).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from qtarget.teacher_cache.engines.base import Engine, EngineError, check_echo, select_topk
from qtarget.teacher_cache.engines.http import EndpointsDown

SPREAD = 96  # vocabulary entries spread over [0, V) in the probe text


def probe_text(tokenizer) -> str:
    n = len(tokenizer)
    ids = sorted(set(range(0, n, max(1, n // SPREAD))) | set(range(max(0, n - 8), n)))
    pieces = ["The quick brown fox jumps over 13 lazy dogs; 2 + 2 = 4.", "naïve café — Größe, 東京, 🙂."]
    pieces += [tokenizer.decode([i]) for i in ids]
    pieces += [t for t in getattr(tokenizer, "all_special_tokens", []) if t]
    return " ".join(pieces)


def check_tokenizer(engine: Engine, tokenizer, label: str) -> None:
    text = probe_text(tokenizer)
    for add in (False, True):
        got = engine.tokenize(text, add)
        if got is None:
            continue
        want = list(tokenizer(text, add_special_tokens=add)["input_ids"])
        if got != want:
            first = next((j for j, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            at = (f"first difference at token {first}: the engine's id {got[first] if first < len(got) else 'none'}, "
                  f"the student's {want[first] if first < len(want) else 'none'}")
            raise EngineError(f"{label}: the teacher's tokenizer is not the student's (a probe text"
                              f"{' with special tokens' if add else ''} gives {len(got)} ids there, {len(want)} with "
                              f"the student's tokenizer; {at}): serve a teacher that shares the student's vocabulary "
                              f"and special tokens")


def preflight(engine: Engine, tokenizer, rows: Sequence[Mapping[str, Any]], *, top_k: int, temperature: float,
              vocab_size: int) -> None:
    engine.check_rows(rows, top_k, temperature)
    # the probe is a whole row (the shortest), never a prefix: a teacher that serves only the rows it was
    # built for (the lab's trunk-shared teacher looks rows up by their full ids) answers it like any row
    candidates = [r for r in rows if len(r["input_ids"]) >= 2]
    probe = (list(map(int, min(candidates, key=lambda r: len(r["input_ids"]))["input_ids"])) if candidates else None)
    views = engine.probes() if hasattr(engine, "probes") else [(engine.name, engine)]
    for label, view in views:
        try:
            check_tokenizer(view, tokenizer, label)
            if probe is None:
                continue
            [answer] = view.prompt_topk([probe], top_k)
        except EndpointsDown:  # this endpoint died (and was dropped); the others are checked
            continue
        check_echo(probe, answer, f"{label}: the probe prompt")
        for t in range(1, len(probe)):
            select_topk(answer.entries[t], top_k, vocab_size, f"the probe prompt, position {t}", label)
    pool = getattr(engine, "pool", None)
    if pool is not None and not pool.live():
        raise pool.down_error()
