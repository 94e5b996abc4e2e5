"""The lab's shared trunk: training the top layers on the frozen trunk computed once vs full forwards, in one
run on SmolLM2-135M-Instruct (top 6 of 30 layers trainable, as the lab trains them).

For each objective (sft; asft, whose frozen reference also runs on the trunk), the same `--steps` optimizer
steps of the lab's trainer on the same demonstrations, interleaved: once with full forwards, once on the
trunk (whose one-time cost, a forward of the bottom layers over the demonstrations, is timed apart and
shared by every objective and seed of a lab run). Prints seconds per step and the ratio, and the largest
difference of the logged losses (the same run up to float rounding).

    .venv/bin/python benchmarks/lab_trunk.py [--steps 6] [--threads 2]

Not a test: timings depend on the machine and its load.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from qtarget.lab import tasks
from qtarget.lab.evaldata import tokenize
from qtarget.lab.finetune import finetune
from qtarget.lab.metrics import Scorer, trunk_split
from qtarget.lab.runner import load_base
from qtarget.lab.settings import settings_for


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    settings = settings_for("default", steps=args.steps, train_examples=8 * args.steps)
    base, tok, _ = load_base(settings)
    rows = tasks.demonstrations(tasks.shop_problems(settings.train_examples, seed=1), noise=0.3, seed=1)
    examples = tokenize(tok, rows, settings.max_length, tasks.INSTRUCTION)
    t0 = time.perf_counter()
    scorer = Scorer(base, examples, pad_token_id=tok.pad_token_id, split=trunk_split(base, 6), batch_size=16)
    trunk = scorer.trunk_lookup()
    once = time.perf_counter() - t0
    print(f"trunk of {len(examples)} demonstrations (bottom 24 layers, once per lab run): {once:.1f} s "
          f"(includes scoring them with the base model, which the lab needs anyway)")
    print(f"{'objective':>10} | {'full s/step':>11} | {'trunk s/step':>12} | {'speed-up':>8} | max |Δloss|")
    with tempfile.TemporaryDirectory() as tmp:
        for objective in ("sft", "asft"):
            runs = {}
            for label, kw in (("full", {}), ("trunk", {"trunk": trunk})):
                _, run = finetune(settings, base, tok, examples, objective, 0, Path(tmp) / f"{objective}-{label}", **kw)
                runs[label] = run
            per_step = {k: r["seconds"] / args.steps for k, r in runs.items()}
            dloss = max(abs(a["loss"] - b["loss"]) for a, b in zip(runs["full"]["history"], runs["trunk"]["history"]))
            print(f"{objective:>10} | {per_step['full']:>11.2f} | {per_step['trunk']:>12.2f} | "
                  f"{per_step['full'] / per_step['trunk']:>7.2f}x | {dloss:.2e}")


if __name__ == "__main__":
    main()
