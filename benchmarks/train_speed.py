"""Training speed: `qtarget train` vs `qtarget.patch` + TRL's SFTTrainer vs plain TRL SFTTrainer.

Three contestants train the same model on the same token rows with the same optimizer (HF AdamW,
lr 1e-5), objective sft (TRL: its default `loss_type="nll"`), completion-only loss on 7/8 of each row:

    qtarget_train   qtarget.training.train (what `qtarget train` runs): QTargetTrainer + the fused engine
    qtarget_patch   trl.SFTTrainer, then qtarget.patch(trainer, "sft"): the fused engine inside TRL
    trl             trl.SFTTrainer as it comes (its own chunked LM head on CPU)              <- baseline

Cases: SmolLM2-135M-Instruct (the cached checkpoint, see tests/conftest.py) cut to its first 4
layers (its own config with num_hidden_layers=4 and the first 4 layers' weights) at seq 256 and
1,024, and the full 30-layer model at seq 256; float32, CPU. Gradient checkpointing is the same for
all: off by default (TRL's `SFTConfig` would turn it on for TRL alone), on with --gradient_checkpointing.
The engine's workspace, kept between steps on CPU, is counted in the peak during the steps.

Each contestant runs in its own subprocess, in interleaved rounds (A B C A B C ...), so a load change
on a shared machine hits every contestant alike; the figures are medians over rounds and ratios to
plain TRL. In a process: `--warmup` optimizer steps, then `--steps` timed ones (step time = between
the ends of consecutive steps: forward, backward, optimizer, data loading, logging — the trainer's
real throughput). Tokens/s counts every token of the batch (total) and the supervised ones (labels
!= -100 after the shift). Peak RSS: the process's peak (`ru_maxrss`, model loading included) and the
peak during the timed steps above the RSS before them (VmHWM reset through /proc/self/clear_refs).

    python benchmarks/train_speed.py                       # all cases, 2 rounds
    python benchmarks/train_speed.py --cases cut4_seq256 --rounds 3

Writes benchmarks/results/train_speed.json, a markdown table (stdout and train_speed.md) and
train_speed.png.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from memory import reset_peak, rss_bytes  # benchmarks/memory.py (scripts run from this folder)
from qtarget.ops.workspace import kept_workspace_bytes

RESULTS = Path(__file__).resolve().parent / "results"
CONTESTANTS = ("qtarget_train", "qtarget_patch", "trl")
BASELINE = "trl"
# name: (layers or None = all, seq, rows per step)
CASES = {"cut4_seq256": (4, 256, 4), "cut4_seq1024": (4, 1024, 1), "full_seq256": (None, 256, 2)}


def token_rows(n_rows: int, seq: int, vocab: int, seed: int = 0) -> list[dict]:
    """Random token rows; the first seq/8 tokens of each are the prompt (not supervised)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n_rows, seq), generator=g)
    prompt = seq // 8
    return [{"input_ids": row.tolist(), "prompt": prompt} for row in ids]


class StepTimer:
    """A TrainerCallback (duck-typed: the trainer calls the methods it has) recording when each
    optimizer step ends, and resetting the peak RSS after the warm-up steps."""

    def __init__(self, warmup: int):
        self.warmup, self.ends, self.base_rss = warmup, [], None

    def __getattr__(self, name):  # every other callback event: nothing to do
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())
        if len(self.ends) == self.warmup:
            reset_peak()
            # the engine's workspace, kept between steps on CPU, is resident in the base but is the loss
            # layer's memory: counted in as if the steps had mapped it
            self.base_rss = rss_bytes("VmRSS") - kept_workspace_bytes()


def load_student(layers: int | None):
    from transformers import AutoModelForCausalLM  # noqa: PLC0415 - child process only

    from qtarget.models import smollm2_dir  # noqa: PLC0415

    path = smollm2_dir()
    kw = {} if layers is None else {"num_hidden_layers": layers}  # the first `layers` layers' weights
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw)
    return model.train(), path


def run_child(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    import datasets  # noqa: PLC0415 - heavy, child only
    import trl  # noqa: PLC0415

    import qtarget  # noqa: PLC0415
    from qtarget.models import load_tokenizer  # noqa: PLC0415
    from qtarget.training import QTargetConfig, train  # noqa: PLC0415

    model, _ = load_student(args.layers)
    tok = load_tokenizer("smollm2")  # the cached SmolLM2 tokenizer (the same files as `path`)
    steps = args.warmup + args.steps
    rows = token_rows(args.batch * steps, args.seq, model.config.vocab_size)
    timer = StepTimer(args.warmup)
    out_dir = tempfile.mkdtemp(prefix="qtarget-train-speed-")
    common = dict(output_dir=out_dir, per_device_train_batch_size=args.batch, max_steps=steps, learning_rate=1e-5,
                  use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True, logging_steps=1,
                  dataloader_num_workers=0, seed=0,
                  # TRL's SFTConfig turns gradient checkpointing on by default, QTargetConfig (like HF's
                  # TrainingArguments) does not: the same setting for all, or the comparison measures it
                  gradient_checkpointing=args.gradient_checkpointing)
    if args.child == "qtarget_train":
        data = [{"input_ids": r["input_ids"], "labels": [-100] * r["prompt"] + r["input_ids"][r["prompt"]:]}
                for r in rows]
        cfg = QTargetConfig(objective="sft", max_length=args.seq, plot=False, **common)
        train(cfg, model=model, tokenizer=tok, train_dataset=data, callbacks=[timer], save_final=False)
    else:
        data = datasets.Dataset.from_list(
            [{"input_ids": r["input_ids"], "completion_mask": [0] * r["prompt"] + [1] * (args.seq - r["prompt"])}
             for r in rows])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = trl.SFTTrainer(model=model, args=trl.SFTConfig(max_length=args.seq, completion_only_loss=True,
                                                                     bf16=False, **common),
                                     train_dataset=data, processing_class=tok, callbacks=[timer])
        if args.child == "qtarget_patch":
            qtarget.patch(trainer, "sft")
        trainer.train()
    if len(timer.ends) != steps:
        raise RuntimeError(f"expected {steps} steps, the trainer ran {len(timer.ends)}")
    step_s = [b - a for a, b in zip(timer.ends[args.warmup - 1:], timer.ends[args.warmup:])]
    supervised = args.batch * (args.seq - 1 - (args.seq // 8 - 1))  # shifted labels: seq - 1 targets, prompt ones masked
    med = statistics.median(step_s)
    return {"contestant": args.child, "step_s": step_s, "median_step_s": med,
            "tokens_per_s": args.batch * args.seq / med, "supervised_tokens_per_s": supervised / med,
            "peak_rss_during_steps_bytes": rss_bytes("VmHWM") - timer.base_rss,
            "peak_rss_process_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "threads": torch.get_num_threads()}


def run_case(name: str, args: argparse.Namespace) -> dict:
    layers, seq, batch = CASES[name]
    runs: dict[str, list[dict]] = {c: [] for c in args.contestants}
    for r in range(args.rounds):
        for contestant in args.contestants:
            cmd = [sys.executable, __file__, "--child", contestant, "--seq", str(seq), "--batch", str(batch),
                   "--warmup", str(args.warmup), "--steps", str(args.steps), "--threads", str(args.threads)]
            if args.gradient_checkpointing:
                cmd.append("--gradient_checkpointing")
            if layers is not None:
                cmd += ["--layers", str(layers)]
            env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "MALLOC_MMAP_THRESHOLD_": "4194304"}
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=Path(__file__).parent)
            if proc.returncode != 0:
                raise SystemExit(f"{name} {contestant} failed:\n{proc.stderr[-4000:]}")
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            runs[contestant].append(res)
            print(f"  {name} round {r + 1}/{args.rounds} {contestant}: {res['tokens_per_s']:.0f} tokens/s, "
                  f"peak {res['peak_rss_process_bytes'] / 2**20:.0f} MiB ({time.perf_counter() - t0:.0f} s)",
                  file=sys.stderr, flush=True)
    return summarize({"case": name, "layers": layers or "all (30)", "seq": seq, "rows_per_step": batch, "runs": runs})


def summarize(case: dict) -> dict:
    """Medians over rounds, the best step of all rounds (the least disturbed by other load on a shared
    machine), and ratios to plain TRL."""
    summary = {}
    tokens = case["rows_per_step"] * case["seq"]
    for contestant, rs in case["runs"].items():
        s = {key: statistics.median(r[key] for r in rs) for key in (
            "tokens_per_s", "supervised_tokens_per_s", "peak_rss_during_steps_bytes", "peak_rss_process_bytes")}
        s["best_tokens_per_s"] = tokens / min(t for r in rs for t in r["step_s"])
        s["step_s_range"] = [min(t for r in rs for t in r["step_s"]), max(t for r in rs for t in r["step_s"])]
        summary[contestant] = s
    base = summary.get(BASELINE)
    if base:
        for s in summary.values():
            s["speed_vs_trl"] = s["tokens_per_s"] / base["tokens_per_s"]
            s["best_speed_vs_trl"] = s["best_tokens_per_s"] / base["best_tokens_per_s"]
            s["peak_process_vs_trl"] = s["peak_rss_process_bytes"] / base["peak_rss_process_bytes"]
            s["peak_steps_vs_trl"] = s["peak_rss_during_steps_bytes"] / max(base["peak_rss_during_steps_bytes"], 1)
    case["summary"] = summary
    return case


def table(cases: list[dict]) -> str:
    lines = ["| case | contestant | tokens/s (median) | supervised tokens/s | speed / TRL (median, best) | "
             "step s (min-max) | peak RSS MiB (process) | peak / TRL | peak during steps MiB | during steps / TRL |",
             "|" + "---|" * 10]
    nan = float("nan")
    for c in cases:
        for name, s in c["summary"].items():
            lo, hi = s["step_s_range"]
            lines.append(f"| {c['case']} | {name} | {s['tokens_per_s']:.0f} | {s['supervised_tokens_per_s']:.0f} | "
                         f"{s.get('speed_vs_trl', nan):.2f}, {s.get('best_speed_vs_trl', nan):.2f} | "
                         f"{lo:.1f}-{hi:.1f} | {s['peak_rss_process_bytes'] / 2**20:.0f} | "
                         f"{s.get('peak_process_vs_trl', nan):.2f} | {s['peak_rss_during_steps_bytes'] / 2**20:.0f} | "
                         f"{s.get('peak_steps_vs_trl', nan):.2f} |")
    return "\n".join(lines)


def plot(cases: list[dict], path: Path) -> None:
    import matplotlib  # noqa: PLC0415 - optional, only for the figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    names = [c["case"] for c in cases]
    contestants = list(cases[0]["summary"])
    width = 0.8 / len(contestants)
    for ax, key, title in ((axes[0], "speed_vs_trl", "tokens/s / plain TRL (higher is faster)"),
                           (axes[1], "peak_process_vs_trl", "peak RSS / plain TRL (lower is leaner)")):
        for i, contestant in enumerate(contestants):
            vals = [c["summary"][contestant].get(key, float("nan")) for c in cases]
            ax.bar([j + i * width for j in range(len(cases))], vals, width, label=contestant)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks([j + width * (len(contestants) - 1) / 2 for j in range(len(cases))], names)
        ax.set_title(title)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    ap.add_argument("--contestants", default=",".join(CONTESTANTS))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS / "train_speed.json"))
    ap.add_argument("--gradient_checkpointing", action="store_true",
                    help="every contestant with gradient checkpointing (default: none; TRL's own default is on)")
    ap.add_argument("--table-only", action="store_true", help="recompute the summary, table and plot of --out")
    ap.add_argument("--child", choices=CONTESTANTS, help=argparse.SUPPRESS)
    ap.add_argument("--layers", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--seq", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args)))
        return 0
    args.contestants = args.contestants.split(",")
    unknown = [c for c in args.cases.split(",") if c not in CASES] + [c for c in args.contestants if c not in CONTESTANTS]
    if unknown:
        ap.error(f"unknown case or contestant: {', '.join(unknown)}")
    if args.warmup < 1 or args.steps < 1:
        ap.error("--warmup and --steps must be >= 1")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.table_only:
        saved = json.loads(out.read_text())
        saved["cases"] = [summarize(c) for c in saved["cases"]]
        out.write_text(json.dumps(saved, indent=1))
        finish(saved["cases"], out)
        return 0
    cases = []
    for name in args.cases.split(","):
        cases.append(run_case(name, args))
        out.write_text(json.dumps({"cases": cases, "settings": {k: getattr(args, k) for k in (
            "rounds", "warmup", "steps", "threads")}, "note": "CPU, float32; shared 2-core box"}, indent=1))
        print(table(cases[-1:]), flush=True)
    finish(cases, out)
    return 0


def finish(cases: list[dict], out: Path) -> None:
    md = table(cases)
    out.with_suffix(".md").write_text(md + "\n")
    plot(cases, out.with_suffix(".png"))
    print(md)


if __name__ == "__main__":
    raise SystemExit(main())
