"""The lab's speed levers against their baselines, in one process on SmolLM2-135M-Instruct (top
`--top` of 30 layers trainable, as the lab trains them):

1. training: the same `--steps` optimizer steps of the lab's trainer on the same demonstrations, with full
   float32 forwards (the baseline), on the frozen trunk computed once (float32), and on the trunk with bf16
   matrix products and eager attention (`--precision bf16`, the lab's default); for sft and asft (whose frozen reference also
   runs on the trunk). Seconds per step, the speed-up over the baseline, and the largest difference of the
   logged losses from the baseline's;
2. teacher-forced scoring of a trained model over the lab's evaluation sequences: full forwards vs the top
   layers on the trunk, float32 vs bf16 (through the pre-cast copy, as the lab scores; the copy's cost
   included); the largest and mean per-token log-prob difference from float32;
3. greedy generation of the held-out problems: float32 vs the bf16 copy (`qtarget.lab.precision`): seconds
   and the share of answers identical to float32's.

The trunk's one-time cost (a forward of the bottom layers over the demonstrations, which the lab's base
model scoring does anyway) is timed apart. Wall seconds and CPU seconds of the process are both printed (on a
machine shared with other jobs, CPU seconds are the steadier measure).

    .venv/bin/python benchmarks/lab_trunk.py [--steps 6] [--threads 2] [--top 6] [--task shop]

Not a test: timings depend on the machine and its load.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from qtarget.lab.builtin_tasks import build_task
from qtarget.lab.evaldata import tokenize
from qtarget.lab.finetune import finetune
from qtarget.lab.metrics import Scorer, chat_sequence, generation_items, trunk_split
from qtarget.lab.precision import compute_context, inference_model, prepare_model
from qtarget.lab.runner import _quiet_libraries, load_base
from qtarget.lab.settings import settings_for


def use_precision(model, precision: str) -> None:
    """The lab's set-up of `model` for `precision` (eager attention for bf16 on a CPU, SDPA otherwise)."""
    model.set_attn_implementation("sdpa")
    prepare_model(model, precision)


class Clock:
    def __enter__(self) -> Clock:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--top", type=int, default=6, help="trainable top layers")
    ap.add_argument("--task", default="shop")
    ap.add_argument("--problems", type=int, default=20, help="generation problems")
    args = ap.parse_args()
    _quiet_libraries()
    torch.set_num_threads(args.threads)
    settings = settings_for("default", steps=args.steps, train_examples=8 * args.steps, train_top_layers=args.top,
                            eval_in_domain=args.problems, rank_items=16, ood_texts=16)
    base, tok, _ = load_base(settings)
    task = build_task(args.task, settings)
    examples = tokenize(tok, task.demonstrations(1, settings.train_examples, 0.3), settings.max_length, task.instruction)
    split = trunk_split(base, args.top)
    with Clock() as c:
        trunk = Scorer(base, examples, pad_token_id=tok.pad_token_id, split=split, batch_size=16).trunk_lookup()
    print(f"task {args.task}, top {args.top} layers trainable, {args.threads} threads")
    print(f"trunk of {len(examples)} demonstrations (bottom {split} layers, once per lab run): {c.wall:.1f} s "
          f"(includes scoring them with the base model, which the lab needs anyway)")
    print("\n1. training: seconds per optimizer step (wall / CPU), speed-up over full float32 forwards, max |Δloss|")
    print(f"{'objective':>10} | {'variant':>12} | {'wall s/step':>11} | {'CPU s/step':>10} | {'speed-up':>8} | max |Δloss|")
    variants = (("full fp32", "fp32", False), ("trunk fp32", "fp32", True), ("trunk bf16", "bf16", True))
    trained = None
    with tempfile.TemporaryDirectory() as tmp:
        for objective in ("sft", "asft"):
            runs = {}
            for label, precision, on_trunk in variants:
                s = settings_for("default", steps=args.steps, train_examples=8 * args.steps,
                                 train_top_layers=args.top, precision=precision)
                use_precision(base, precision)
                with Clock() as c:
                    model, run = finetune(s, base, tok, examples, objective, 0, Path(tmp) / f"{objective}-{label}",
                                          trunk=trunk if on_trunk else None)
                runs[label] = (c, [h["loss"] for h in run["history"]])
                if objective == "sft" and label == "trunk fp32":
                    trained = model
            ref_c, ref_loss = runs["full fp32"]
            for label, (c, loss) in runs.items():
                dloss = max(abs(a - b) for a, b in zip(ref_loss, loss))
                print(f"{objective:>10} | {label:>12} | {c.wall / args.steps:>11.2f} | {c.cpu / args.steps:>10.2f} | "
                      f"{ref_c.cpu / c.cpu:>7.2f}x | {dloss:.2e}")

    print("\n2. teacher-forced scoring of the trained sft model (ranking candidates + OOD-free demonstrations)")
    seqs = [chat_sequence(tok, it["prompt"], cand, settings.max_length, instruction=task.instruction)
            for it in task.ranking for cand in it["candidates"]] + examples
    scored = {}
    for label, precision, on_trunk in (("full fp32", "fp32", False), ("trunk fp32", "fp32", True),
                                       ("trunk bf16", "bf16", True)):
        use_precision(base, precision)
        use_precision(trained, precision)
        with compute_context(precision, base):  # as the lab scores: bf16 through the pre-cast copies
            scorer = Scorer(inference_model(base, precision), seqs, pad_token_id=tok.pad_token_id,
                            split=split if on_trunk else None)
            with Clock() as c:
                out = scorer.score(inference_model(trained, precision))
        scored[label] = (c, np.concatenate([o.logp for o in out]))
    ref_c, ref = scored["full fp32"]
    tokens = sum(len(s["input_ids"]) for s in seqs)
    for label, (c, logp) in scored.items():
        print(f"{label:>12}: {c.wall:6.1f} s wall, {c.cpu:6.1f} s CPU over {len(seqs)} sequences ({tokens} tokens); "
              f"speed-up {ref_c.cpu / c.cpu:.2f}x; max |Δ log p| {np.abs(logp - ref).max():.3f}, mean "
              f"{np.abs(logp - ref).mean():.4f}")

    print(f"\n3. greedy generation, {len(task.generation)} problems, at most {settings.max_new_tokens} new tokens")
    gens = {}
    for precision in ("fp32", "bf16"):
        use_precision(trained, precision)
        with compute_context(precision, base), Clock() as c:
            g = generation_items(inference_model(trained, precision), tok, task,
                                 max_new_tokens=settings.max_new_tokens, batch_size=settings.eval_batch_size, seed=0)
        gens[precision] = (c, g)
    (c32, g32), (c16, g16) = gens["fp32"], gens["bf16"]
    same = np.mean([a == b for a, b in zip(g32["responses"], g16["responses"])])
    for precision, (c, g) in gens.items():
        print(f"{precision:>12}: {c.wall:6.1f} s wall, {c.cpu:6.1f} s CPU, {int(g['tokens'].sum())} tokens, "
              f"accuracy {g['correct'].mean():.2f}, no answer {g['no_answer'].mean():.2f}")
    print(f"bf16 speed-up {c32.cpu / c16.cpu:.2f}x (CPU); answers identical to float32's: {same:.2f}")


if __name__ == "__main__":
    main()
