"""`qtarget eval`: evaluate a causal LM on reasoning benchmarks.

    qtarget eval --model PATH --benchmarks gsm8k_100,champ --samples 4 --temperature 1.0
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from qtarget import cli
from qtarget.cli_args import add_bool_flag, check_number, check_output_path
from qtarget.data.reading import parse_chat_template
from qtarget.evaluation.benchmarks import HubUnavailableError, load_benchmarks
from qtarget.evaluation.data_file import data_problems
from qtarget.evaluation.generation import VLLMGenerator, vllm_available
from qtarget.evaluation.runner import evaluate
from qtarget.models.load import load_model, load_tokenizer, resolve


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(
        prog="qtarget eval",
        description="Generate answers to reasoning problems and score them (accuracy, avg@k, pass@k, "
                    "response length, cut rate, token entropy). Rerunning into the same --output_dir resumes.",
    )
    p.add_argument("--model", required=True,
                   help="local folder or hub id of a causal LM; 'smollm2' = the offline SmolLM2-135M-Instruct")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder or hub id (default: same as --model)")
    p.add_argument("--benchmarks", default="gsm8k_100",
                   help="comma-separated: gsm8k_100, champ, arith, arith:N, math500, aime24, amc23, "
                        "minerva_math, olympiadbench, gpqa_diamond, or path.jsonl (question/answer fields)")
    p.add_argument("--dataset", default=None, help="evaluate on a training data file instead (any format of `qtarget "
                                                   "train`), each row prompted with the tokens training puts before "
                                                   "its reply; gold = --answer_column or the answer the reply states")
    p.add_argument("--answer_column", default="answer", help="with --dataset: the column of each row's final answer")
    p.add_argument("--chat_template", nargs="?", const="true", default=None, type=parse_chat_template,
                   metavar="auto|true|false", help="with --dataset: prompt/response rows through the chat template; "
                                                   "auto (default) decides per format as `qtarget train` does")
    p.add_argument("--limit", type=int, default=None, help="first N problems of each benchmark")
    p.add_argument("--samples", type=int, default=1, help="samples per problem (n of pass@k / avg@n)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--max_new_tokens", type=int, default=512)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt_style", choices=["auto", "chat", "plain"], default="auto")
    p.add_argument("--instruction", default=None, help="replaces the default 'reason step by step ... \\boxed{}'")
    p.add_argument("--system_prompt", default=None)
    p.add_argument("--backend", choices=["hf", "vllm"], default="hf", help="generation backend")
    p.add_argument("--answer_backend", choices=["auto", "math_verify", "sympy"], default="auto",
                   help="symbolic equivalence: math-verify (when installed) or the sympy fallback")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "auto"], default="float32")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--output_dir", default=None, help="default: eval_out/<model name>")
    add_bool_flag(p, "regrade", help="re-check responses already in --output_dir with the current answer checker")
    add_bool_flag(p, "no_progress", help="no progress bar")
    return p


def check_args(args: argparse.Namespace) -> None:
    """The numeric options, before anything loads."""
    for name, low in (("samples", 1), ("max_new_tokens", 1), ("batch_size", 1), ("limit", 1), ("threads", 1)):
        value = getattr(args, name)
        if value is not None and value < low:
            raise ValueError(f"--{name} must be >= {low}, got {value}")
    check_number("seed", args.seed, 0, integer=True)
    check_number("temperature", args.temperature, 0)
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top_p must be in (0, 1], got {args.top_p}")


def main(argv: list[str]) -> int:
    """Bad input raises ValueError / FileNotFoundError; `qtarget.cli` prints it as one line, exit 2."""
    args = build_parser().parse_args(argv)
    check_args(args)
    problems = []
    if args.dataset is None:
        try:
            problems = load_benchmarks(args.benchmarks, limit=args.limit, seed=args.seed)
        except (HubUnavailableError, ModuleNotFoundError) as e:  # the benchmark asked for cannot be reached here
            raise ValueError(str(e)) from e
    if args.threads:
        torch.set_num_threads(args.threads)
    output_dir = Path(args.output_dir or Path("eval_out") / Path(args.model.rstrip("/")).name)
    check_output_path(output_dir)
    # a missing folder or an unreachable hub id is a one-line error naming --tokenizer / --model
    tokenizer = load_tokenizer(args.tokenizer, role="tokenizer") if args.tokenizer else load_tokenizer(args.model)
    if args.dataset is not None:  # read as `qtarget train` reads it (qtarget.data.reading)
        problems, data_line = data_problems(args.dataset, tokenizer, answer_column=args.answer_column,
                                            chat_template=args.chat_template)
        problems = problems[:args.limit] if args.limit else problems
        print(f"[qtarget] eval data: {data_line}", file=sys.stderr)

    generator = None
    model = None
    if args.backend == "vllm":
        if not vllm_available():
            raise ValueError("--backend vllm needs the vllm package (pip install vllm)")
        generator = VLLMGenerator(resolve(args.model), tokenizer=tokenizer, seed=args.seed,
                                  dtype=args.dtype if args.dtype != "float32" else "auto")
    else:
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = load_model(args.model, role="student", dtype=args.dtype).to(device)

    try:
        result = evaluate(
            model, tokenizer, problems, samples=args.samples, temperature=args.temperature, top_p=args.top_p,
            max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed,
            output_dir=output_dir, prompt_style=args.prompt_style, instruction=args.instruction,
            system_prompt=args.system_prompt, progress=not args.no_progress, generator=generator,
            answer_backend=args.answer_backend, model_name=args.model, regrade=args.regrade,
        )
    except KeyboardInterrupt:
        print(f"\nqtarget eval: interrupted; finished batches are in {output_dir}; rerun to resume",
              file=sys.stderr)
        return 130
    print(result.table)
    print(f"wrote {output_dir}/samples.jsonl, summary.json, summary.md "
          f"({result.summary['generated']} samples generated now)")
    return 0


if __name__ == "__main__":  # pragma: no cover - `python -m ...`: through the one CLI wrapper
    sys.exit(cli.main(["eval", *sys.argv[1:]]))
