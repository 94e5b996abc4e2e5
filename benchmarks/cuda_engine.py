"""LM-head loss on a CUDA device: qtarget's fused engine against the naive full-logits path, TRL's
chunked log-prob kernel (what `SFTTrainer` runs for loss_type "nll"; "chunked_nll" is its deprecated
alias) and Liger-Kernel's fused linear cross-entropy (when installed). Exits without measuring when
no CUDA device is present.

bf16 hidden states and head, V = 151,936 (Qwen2.5's vocabulary), H = 896, N up to 32k tokens, sft
(the one objective every contestant computes) and dft (qtarget and TRL's dft on its log-probs).
Time: median of --reps fwd+bwd measured with CUDA events after one warm-up; memory: peak of
`torch.cuda.max_memory_allocated` during one fwd+bwd minus the memory allocated before it (inputs
and weights), so the gradients of hidden and head are inside the measured region for everyone.

    python benchmarks/cuda_engine.py                      # N = 4096, 8192, 16384, 32768
    python benchmarks/cuda_engine.py --N 8192 --reps 5 --contestants naive,fused,trl

Writes benchmarks/results/cuda_engine.json and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch

import qtarget
from qtarget.ops.kernels import COMPILE_ENV

RESULTS = Path(__file__).resolve().parent / "results" / "cuda_engine.json"
CONTESTANTS = ("naive", "fused", "fused_eager", "trl", "liger")


def step_fn(name: str, objective: str, h, W, y):
    """A fwd+bwd closure, or None when the contestant cannot run this objective / is not installed."""
    if name == "naive":
        return lambda: qtarget.token_loss(objective, h @ W.T, y).loss.backward()
    if name in ("fused", "fused_eager"):
        env = {COMPILE_ENV: "0"} if name == "fused_eager" else {}

        def run():
            old = {k: os.environ.get(k) for k in env}
            os.environ.update(env)
            try:
                qtarget.fused_token_loss(objective, h, W, y).loss.backward()
            finally:
                for k, v in old.items():
                    os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        return run
    if name == "trl":
        try:
            from trl.kernels import ChunkedLogProbFunction
            from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE as vocab_chunk
        except ImportError:
            return None

        def run():
            logp = ChunkedLogProbFunction.apply(h, W, None, y, 1.0, vocab_chunk, None, 1.0, ())[0]
            weight = logp.detach().exp() if objective == "dft" else 1.0
            (-(weight * logp).sum() / y.numel()).backward()
        return run
    if name == "liger":
        if objective != "sft":
            return None
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        except ImportError:
            return None
        loss_fn = LigerFusedLinearCrossEntropyLoss()
        return lambda: loss_fn(W, h, y).backward()
    raise ValueError(f"unknown contestant {name!r}")


def measure(fn, reps: int, params) -> dict:
    def clear():
        for p in params:
            p.grad = None

    fn()  # warm-up (compiles the fused kernel, autotunes Triton)
    clear()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    clear()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000.0)
        clear()
    return {"seconds": statistics.median(times), "times": times, "peak_bytes": peak}


def run_case(N: int, objective: str, contestants: list[str], reps: int, H: int, V: int) -> list[dict]:
    torch.manual_seed(0)
    W = (torch.randn(V, H, device="cuda") * (1.0 / H**0.5)).to(torch.bfloat16).requires_grad_(True)
    h = torch.randn(N, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = torch.randint(0, V, (N,), device="cuda")
    rows = []
    for name in contestants:
        fn = step_fn(name, objective, h, W, y)
        case = {"N": N, "H": H, "V": V, "objective": objective, "contestant": name, "dtype": "bfloat16"}
        if fn is None:
            rows.append({**case, "skip": "not available"})
            continue
        try:
            rows.append({**case, **measure(fn, reps, (h, W))})
        except torch.cuda.OutOfMemoryError:
            rows.append({**case, "skip": "out of memory"})
        h.grad = W.grad = None
        torch.cuda.empty_cache()
        print(f"N={N} {objective} {name}: {rows[-1].get('seconds', rows[-1].get('skip'))}", file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict]) -> str:
    names = [c for c in CONTESTANTS if any(r["contestant"] == c for r in rows)]
    head = ["N", "objective"] + [f"{c} ms / MiB" for c in names] + ["fused / trl time", "fused / liger time"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    index = {(r["N"], r["objective"], r["contestant"]): r for r in rows}
    for N, obj in sorted({(r["N"], r["objective"]) for r in rows}):
        cells = [str(N), obj]
        for c in names:
            r = index.get((N, obj, c), {})
            cells.append(f"{1000 * r['seconds']:.1f} / {r['peak_bytes'] / 2**20:.0f}" if "seconds" in r
                         else r.get("skip", ""))
        fused = index.get((N, obj, "fused"), {})
        for other in ("trl", "liger"):
            o = index.get((N, obj, other), {})
            cells.append(f"{fused['seconds'] / o['seconds']:.2f}" if "seconds" in fused and "seconds" in o else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--N", default="4096,8192,16384,32768")
    ap.add_argument("--objectives", default="sft,dft")
    ap.add_argument("--contestants", default=",".join(CONTESTANTS))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--H", type=int, default=896)
    ap.add_argument("--V", type=int, default=151936)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/cuda_engine.py: no CUDA device here; nothing measured")
        return 0
    rows = []
    for N in (int(n) for n in args.N.split(",")):
        for obj in args.objectives.split(","):
            rows += run_case(N, obj, args.contestants.split(","), args.reps, args.H, args.V)
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                       "cases": rows}, indent=1))
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
