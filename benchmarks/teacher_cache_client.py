"""The client's cost of a served teacher: what `qtarget teacher-cache --engine vllm-server` spends per
token on one answer of vLLM's shape (JSON decode, entries parsed, top-k selected), so you know how
many processes keep a server busy. A synthetic answer: one 2048-token row at k = 64 over a 151,936-token
vocabulary (Qwen's), with vLLM's decoded_token strings and the label as entry k + 1.

    .venv/bin/python benchmarks/teacher_cache_client.py [--tokens 2048] [--top_k 64] [--repeats 3]

Printed: the answer's size, the time of each step (best of --repeats), the client's ceiling in tokens/s
per process, and select_many (numpy, all positions at once) against the per-position select_topk
(the ratio in this process). Not a test: timings depend on the machine and its load.
"""
from __future__ import annotations

import argparse
import json
import random
import time

from qtarget.teacher_cache.engines.base import select_many, select_topk
from qtarget.teacher_cache.engines.vllm_server import parse_entries


def answer(T: int, k: int, V: int, seed: int = 0) -> tuple[bytes, list[int]]:
    rng = random.Random(seed)
    ids = [rng.randrange(V) for _ in range(T)]
    entries: list = [None]
    for t in range(1, T):
        d = {str(rng.randrange(V)): {"logprob": -rng.random() * 20, "rank": r + 1, "decoded_token": f"tok{r}"}
             for r in range(k)}
        d[str(ids[t])] = {"logprob": -30.0, "rank": 500, "decoded_token": "label"}
        entries.append(d)
    return json.dumps({"choices": [{"index": 0, "prompt_logprobs": entries, "prompt_token_ids": ids}]}).encode(), ids


def best(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--top_k", type=int, default=64)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    T, k, V = a.tokens, a.top_k, a.vocab
    raw, _ = answer(T, k, V)
    t_json, data = best(lambda: json.loads(raw), a.repeats)
    t_parse, entries = best(lambda: parse_entries(data["choices"][0]["prompt_logprobs"]), a.repeats)
    t_many, (ids, lps) = best(lambda: select_many(entries[1:], k, V, str), a.repeats)
    t_one, ref = best(lambda: [select_topk(entries[t], k, V, "", "") for t in range(1, T)], a.repeats)
    assert [r[0] for r in ref] == ids.tolist() and [r[1] for r in ref] == lps.tolist()
    total = t_json + t_parse + t_many
    print(f"answer of {T} tokens at k={k}: {len(raw) / 1e6:.1f} MB ({len(raw) / T:,.0f} B per token)")
    print(f"json.loads {t_json * 1e3:.0f} ms | parse {t_parse * 1e3:.0f} ms | select_many {t_many * 1e3:.0f} ms "
          f"(per-position select_topk {t_one * 1e3:.0f} ms: ratio {t_many / t_one:.2f}x)")
    print(f"client ceiling: {T / total:,.0f} tokens/s per process ({total / T * 1e6:.0f} us per token)")


if __name__ == "__main__":
    main()
