"""TRL drop-in benchmark: one TRL `SFTTrainer` training step (forward + backward + optimizer step) at
4,096 tokens x V = 49,152, with the loss computed three ways:

    dropin   `qtarget.patch(trainer, "dft")`: qtarget's fused engine inside the model's forward
    trl_dft  TRL's own `loss_type="dft"` (its chunked fused LM head)                       <- baseline
    full     full logits: `compute_loss_func` computing dft with `qtarget.token_loss` on [tokens x V]

Each variant runs in its own subprocess (one variant's allocations cannot shape another's peak).
Peak memory = peak RSS during the measured step (VmHWM, reset through /proc/self/clear_refs) minus the
RSS just before it, after a warm-up step (so gradients and optimizer state exist for every variant);
qtarget's workspace, kept from the warm-up step, is counted in the step's peak.
Step time = best of `--reps` steps after the warm-up. On a CUDA device (`--device cuda`) peak memory is
`torch.cuda.max_memory_allocated` above the allocation before the step.

    python benchmarks/trl_dropin.py [--tokens 4096] [--vocab 49152] [--hidden 256] [--reps 3]

Prints one table of ratios against trl_dft, and writes benchmarks/results/trl_dropin.json. A benchmark,
not a test: the numbers are recorded in docs/engine.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import datasets
import torch
import trl

import qtarget
from qtarget.models import load_tokenizer, tiny_causal_lm
from qtarget.ops.workspace import kept_workspace_bytes

from memory import reset_peak, rss_bytes  # benchmarks/memory.py (scripts run from this folder)

VARIANTS = ("dropin", "trl_dft", "full")
BASELINE = "trl_dft"
RESULTS = Path(__file__).resolve().parent / "results" / "trl_dropin.json"


def run_variant(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    model = tiny_causal_lm(args.vocab, hidden_size=args.hidden, num_layers=args.layers, num_heads=4,
                           max_position_embeddings=args.seq).train()
    tok = load_tokenizer("gpt2")
    dft = qtarget.get_objective("dft")

    def full_logits_dft(outputs, labels, num_items_in_batch=None):
        return qtarget.token_loss(dft, outputs.logits[:, :-1], labels[:, 1:].to(outputs.logits.device),
                                  normalizer=num_items_in_batch).loss

    config = dict(output_dir="/tmp/qtarget-trl-dropin", per_device_train_batch_size=1, learning_rate=1e-4,
                  report_to="none", save_strategy="no", disable_tqdm=True, max_length=args.seq,
                  use_cpu=args.device == "cpu", bf16=False)
    extra = {}
    if args.variant == "trl_dft":
        config["loss_type"] = "dft"
    elif args.variant == "full":
        extra["compute_loss_func"] = full_logits_dft
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trl.SFTTrainer(model=model, args=trl.SFTConfig(**config), processing_class=tok,
                                 train_dataset=datasets.Dataset.from_list([{"text": "a b c"}] * 2), **extra)
    if args.variant == "dropin":
        qtarget.patch(trainer, "dft")
    model = trainer.model.to(device)
    trainer.create_optimizer()
    opt = trainer.optimizer

    g = torch.Generator().manual_seed(0)
    rows = args.tokens // args.seq
    ids = torch.randint(0, args.vocab, (rows, args.seq), generator=g)
    labels = ids.clone()
    labels[:, : args.seq // 8] = -100  # a prompt
    batch = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": labels.to(device)}
    n = torch.tensor(int(labels[:, 1:].ne(-100).sum()), device=device)

    def step() -> float:
        loss = trainer.training_step(model, dict(batch), num_items_in_batch=n)
        opt.step()
        opt.zero_grad(set_to_none=False)
        return float(loss)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    loss = step()  # warm-up: gradients and optimizer state allocated
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        # the engine's workspace, kept between steps on CPU, is resident in the base but is the loss
        # layer's memory: counted in as if the step had mapped it
        base = rss_bytes("VmRSS") - kept_workspace_bytes()
        reset_peak()
    step()
    sync()
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda" else rss_bytes("VmHWM")) - base
    times = []
    for _ in range(args.reps):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return {"variant": args.variant, "peak_bytes": int(peak), "step_s": min(times), "first_loss": loss,
            "threads": torch.get_num_threads(), "device": str(device)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--seq", type=int, default=1024, help="tokens per row (rows = tokens / seq)")
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    if args.tokens % args.seq:
        raise SystemExit(f"--tokens ({args.tokens}) must be a multiple of --seq ({args.seq})")
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    results = {}
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--variant", variant] + [
            f"--{k}={getattr(args, k)}" for k in ("tokens", "seq", "vocab", "hidden", "layers", "reps", "device")]
        # glibc: freed blocks up to its adaptive mmap threshold stay resident and skew RSS peaks (as in
        # benchmarks/loss_engine.py): serve blocks >= 4 MiB by mmap so they are returned when freed
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "MALLOC_MMAP_THRESHOLD_": "4194304"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"{variant} failed:\n{proc.stderr[-4000:]}")
        results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    base = results[BASELINE]
    print(f"TRL SFTTrainer step, {args.tokens} tokens x V={args.vocab}, hidden {args.hidden}, {args.layers} layers, "
          f"{args.device} ({base['threads']} threads); ratios vs TRL loss_type='dft'")
    print("| variant | peak MiB | step s | peak / TRL | time / TRL | first loss |")
    print("|---|---|---|---|---|---|")
    for variant, r in results.items():
        r["peak_ratio"] = r["peak_bytes"] / base["peak_bytes"]
        r["time_ratio"] = r["step_s"] / base["step_s"]
        print(f"| {variant} | {r['peak_bytes'] / 2**20:.0f} | {r['step_s']:.3f} | {r['peak_ratio']:.2f} | "
              f"{r['time_ratio']:.2f} | {r['first_loss']:.6f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"settings": {k: getattr(args, k) for k in ("tokens", "seq", "vocab", "hidden", "layers",
                                                                          "reps", "device")},
                               "results": results}, indent=1))


if __name__ == "__main__":
    main()
