"""Generation throughput of SmolLM2-135M-Instruct on this machine: greedy, batch 1 vs batch 16.

    .venv/bin/python benchmarks/generation.py [--new_tokens 64] [--prompts 16] [--threads N]

Both runs decode the same chat prompts (GSM8K questions) to exactly `--new_tokens` tokens (EOS ignored, so
the work is the same) and report generated tokens per second; the ratio is batch-16 over batch-1 measured in
this process. Not a test: timings depend on the machine and its load.
"""
from __future__ import annotations

import argparse
import time

import torch

from qtarget.evaluation.benchmarks import load_benchmark
from qtarget.evaluation.generation import HFGenerator
from qtarget.evaluation.prompts import prompt_ids
from qtarget.models import load_smollm2


def _time(gen: HFGenerator, prompts: list[list[int]], new_tokens: int) -> tuple[float, int]:
    t0 = time.perf_counter()
    out = gen.generate(prompts, max_new_tokens=new_tokens)
    dt = time.perf_counter() - t0
    return dt, sum(s.num_tokens for s in out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_smollm2()
    problems = load_benchmark("gsm8k_100", limit=args.prompts)
    prompts = [prompt_ids(tok, p) for p in problems]
    # an EOS id that never occurs makes every sequence run to new_tokens: equal work in both settings
    never = [len(tok) + 10]
    g1 = HFGenerator(model, tok, batch_size=1, eos_token_ids=never)
    g16 = HFGenerator(model, tok, batch_size=16, eos_token_ids=never)
    _time(g1, prompts[:1], 4)  # warm-up
    n1 = max(2, args.prompts // 4)  # batch 1 is slow; time a subset of prompts
    t1, k1 = _time(g1, prompts[:n1], args.new_tokens)
    t16, k16 = _time(g16, prompts, args.new_tokens)
    r1, r16 = k1 / t1, k16 / t16
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, prompts ~{sum(map(len, prompts)) // len(prompts)} tokens")
    print("| setting | prompts | new tokens | seconds | tokens/s |")
    print("|---|---|---|---|---|")
    print(f"| batch 1  | {n1} | {k1} | {t1:.1f} | {r1:.1f} |")
    print(f"| batch 16 | {len(prompts)} | {k16} | {t16:.1f} | {r16:.1f} |")
    print(f"batch-16 / batch-1 throughput ratio: {r16 / r1:.2f}x")


if __name__ == "__main__":
    main()
