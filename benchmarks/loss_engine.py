"""Loss-layer benchmark: naive full-logits path vs the fused chunked engine (and TRL's chunked
log-prob path for dft), forward + backward wall time and peak memory above the inputs.

Each case runs in its own subprocess (`--case JSON`), so one case's allocations cannot shape another's
peak. Peak memory = peak RSS during one fwd+bwd (VmHWM, reset through /proc/self/clear_refs) minus
the RSS with inputs, weights and auxiliary models allocated; gradients of hidden and head are
inside the measured region for every path. Wall time = best of `--reps` fwd+bwd after one warm-up.

    python benchmarks/loss_engine.py                 # full grid (long: run it in the background)
    python benchmarks/loss_engine.py --quick         # N=2048 and 8192, V=49152
    python benchmarks/loss_engine.py --calibrate     # k = temporaries per chunk (qtarget.ops.budget)

Writes benchmarks/results/loss_engine.json and prints a markdown table. A benchmark, not a test.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from memory import reset_peak, rss_bytes  # benchmarks/memory.py (scripts run from this folder)

OBJECTIVES = ["sft", "dft", "psft", "asft", "target_sft"]
NEEDS_AUX_MODEL = {"asft": "ref", "sft_kl": "ref", "target_sft": "teacher", "kd": "teacher", "distill_hybrid": "teacher"}
RESULTS = Path(__file__).resolve().parent / "results" / "loss_engine.json"
NAIVE_LIMIT_BYTES = 14 * 2**30  # skip naive cases whose estimated footprint exceeds this
NAIVE_TEMPORARIES = 7  # [N, V] float32 tensors alive at the naive path's peak (estimate for skipping)


# ----------------------------------------------------------------------------------- one case
def _build(case: dict):
    import torch

    torch.manual_seed(0)
    N, H, V, obj = case["N"], case["H"], case["V"], case["objective"]
    hidden = (torch.randn(N, H)).requires_grad_(True)
    weight = (torch.randn(V, H) * (2.0 / H**0.5)).requires_grad_(True)
    labels = torch.randint(0, V, (N,))
    labels[torch.rand(N) < 0.1] = -100  # prompt / padding positions
    aux: dict = {}
    if obj == "psft":
        aux["old_logprobs"] = -torch.rand(N) * 5
    who = NEEDS_AUX_MODEL.get(obj)
    if who:
        aux[f"{who}_hidden"] = torch.randn(N, H)
        aux[f"{who}_head"] = torch.randn(V, H) * (2.0 / H**0.5)
    return hidden, weight, labels, aux


def _step_fn(case: dict, hidden, weight, labels, aux):
    import torch

    import qtarget

    obj = qtarget.get_objective(case["objective"])
    path = case["path"]
    if path == "naive":
        def step():
            kw = {k: v for k, v in aux.items() if not k.endswith(("_hidden", "_head"))}
            with torch.no_grad():
                for who in ("teacher", "ref"):
                    if f"{who}_hidden" in aux:
                        kw[f"{who}_logits"] = aux[f"{who}_hidden"] @ aux[f"{who}_head"].T
            res = qtarget.token_loss(obj, hidden @ weight.T, labels, **kw)
            res.loss.backward()
            return res.loss
    elif path in ("fused", "fused_recompute"):
        mode = "recompute" if path == "fused_recompute" else "forward"

        def step():
            res = qtarget.fused_token_loss(obj, hidden, weight, labels, mode=mode,
                                           chunk_size=case.get("chunk_size"), **aux)
            res.loss.backward()
            return res.loss
    elif path == "trl":
        from trl.kernels import ChunkedLogProbFunction

        if case["objective"] != "dft":
            raise ValueError("the TRL column exists for dft only")
        mask = labels != -100

        def step():
            logp = ChunkedLogProbFunction.apply(hidden[mask], weight, None, labels[mask], 1.0, 32768, None, 1.0, ())[0]
            loss = -(logp.detach().exp() * logp).sum() / mask.sum()
            loss.backward()
            return loss
    else:
        raise ValueError(f"unknown path {path!r}")
    return step


def run_case(case: dict) -> dict:
    import torch

    if case.get("threads"):
        torch.set_num_threads(int(case["threads"]))
    hidden, weight, labels, aux = _build(case)
    step = _step_fn(case, hidden, weight, labels, aux)
    reps = int(case.get("reps", 3))
    out: dict = {}

    def clear():
        hidden.grad = None
        weight.grad = None

    base = rss_bytes("VmRSS")
    reset_peak()
    t0 = time.perf_counter()
    loss = step()  # first call: memory (and warm-up)
    first = time.perf_counter() - t0
    out["peak_bytes"] = rss_bytes("VmHWM") - base
    out["loss"] = float(loss.detach())
    del loss
    clear()
    times = [first] if reps <= 1 else []
    for _ in range(reps - 1 if reps > 1 else 0):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        clear()
    if case.get("pair"):
        # The machine is shared: time the naive path in this process too, alternating with this one,
        # so that the ratio compares runs under the same load.
        naive = _step_fn({**case, "path": "naive"}, hidden, weight, labels, aux)
        naive_times = []
        for _ in range(int(case["pair"])):
            for fn, sink in ((naive, naive_times), (step, times)):
                t0 = time.perf_counter()
                fn()
                sink.append(time.perf_counter() - t0)
                clear()
        out["naive_seconds_same_process"] = min(naive_times)
    out["seconds"] = min(times)
    out["times"] = times
    return out


def calibrate(V: int = 49152, H: int = 576, rows: int = 256) -> None:
    """Temporaries per chunk: peak bytes above inputs (minus grads) / (4 * V * rows), per objective."""
    for obj in ["sft", "dft", "psft", "eaft", "gem", "asft", "sft_kl", "target_sft", "kd", "distill_hybrid", "target"]:
        case = {"objective": obj, "path": "fused", "N": rows * 4, "H": H, "V": V, "chunk_size": rows, "reps": 1}
        res = _spawn(case, timeout=600)
        grads = 4 * (V * H + rows * 4 * H) * 2  # grad_W (fp32 acc + returned copy) and grad_hidden
        k = (res.get("peak_bytes", float("nan")) - grads) / (4 * V * rows)
        print(f"{obj:12s} peak {res.get('peak_bytes', 0) / 2**20:8.1f} MiB  k = {k:.2f}", flush=True)


# ---------------------------------------------------------------------------------- the driver
def _spawn(case: dict, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--case", json.dumps(case)]
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    # glibc serves blocks below its (adaptive, up to 32 MiB) mmap threshold from the heap and keeps
    # freed ones resident, so RSS would count retained free memory: a fixed 4 MiB threshold makes
    # every [c, V] buffer an mmap that is returned on free, and the peak RSS track live tensors.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(4 * 2**20))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f}s"}
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
        return {"error": "killed (out of memory?)" if proc.returncode in (-9, 137) else tail[0][:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def grid(quick: bool, objectives: list[str], paths: list[str], Ns: list[int] | None = None,
         Vs: list[int] | None = None, reps: int | None = None, pair: int = 0) -> list[dict]:
    Ns = Ns or ([2048, 8192] if quick else [2048, 8192, 32768])
    Vs = Vs or ([49152] if quick else [49152, 151936])
    cases = []
    for V in Vs:
        for N in Ns:
            for obj in objectives:
                for path in paths:
                    if path == "trl" and obj != "dft":
                        continue
                    case = {"objective": obj, "path": path, "N": N, "H": 576, "V": V,
                            "reps": 3 if N * V <= 8192 * 49152 else 2}
                    if N * V >= 32768 * 49152:
                        case["reps"] = 1
                    if reps is not None:
                        case["reps"] = reps
                    if pair and path != "naive":
                        case["pair"] = pair
                    if path == "naive":
                        k = NAIVE_TEMPORARIES + (3 if obj in NEEDS_AUX_MODEL else 0)
                        if N * V * 4 * k > NAIVE_LIMIT_BYTES:
                            case["skip"] = f"naive needs ~{N * V * 4 * k / 2**30:.0f} GiB"
                    cases.append(case)
    return cases


def table(rows: list[dict]) -> str:
    """Markdown: one row per (V, N, objective); columns per path: time (s) and peak (MiB)."""
    paths = [p for p in ("naive", "fused", "fused_recompute", "trl") if any(r["path"] == p for r in rows)]
    keys = sorted({(r["V"], r["N"], r["objective"]) for r in rows},
                  key=lambda k: (k[0], k[1], OBJECTIVES.index(k[2]) if k[2] in OBJECTIVES else 99))
    head = ["V", "N", "objective"]
    for p in paths:
        head += [f"{p} s", f"{p} MiB"]
    head += ["fused/naive time", "same-process time ratio", "fused/naive mem"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    index = {(r["V"], r["N"], r["objective"], r["path"]): r for r in rows}
    for V, N, obj in keys:
        cells = [str(V), str(N), obj]
        for p in paths:
            r = index.get((V, N, obj, p))
            if r is None:
                cells += ["", ""]
            elif "seconds" in r:
                cells += [f"{r['seconds']:.2f}", f"{r['peak_bytes'] / 2**20:.0f}"]
            else:
                cells += [r.get("skip") or r.get("error", "?"), ""]
        naive, fused = index.get((V, N, obj, "naive")), index.get((V, N, obj, "fused"))
        pair = (f"{fused['seconds'] / fused['naive_seconds_same_process']:.2f}"
                if fused and "naive_seconds_same_process" in fused else "")
        if naive and fused and "seconds" in naive and "seconds" in fused:
            cells += [f"{fused['seconds'] / naive['seconds']:.2f}", pair,
                      f"{fused['peak_bytes'] / naive['peak_bytes']:.3f}"]
        else:
            cells += ["", pair, ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def working_bytes(r: dict) -> int:
    """Peak minus the gradients every path returns (hidden [N, H] and head [V, H], float32)."""
    return r["peak_bytes"] - 4 * (r["N"] * r["H"] + r["V"] * r["H"])


def growth(rows: list[dict]) -> str:
    """Fused peak memory at the largest N over the smallest, per (V, objective): the whole peak, and
    the working memory (peak minus the returned gradients, of which hidden's grows with N)."""
    out = []
    for V in sorted({r["V"] for r in rows}):
        for obj in OBJECTIVES:
            got = sorted((r["N"], r["peak_bytes"], working_bytes(r)) for r in rows
                         if r["V"] == V and r["objective"] == obj and r["path"] == "fused" and "peak_bytes" in r)
            if len(got) >= 2:
                (n0, p0, w0), (n1, p1, w1) = got[0], got[-1]
                out.append(f"V={V} {obj}: fused peak N={n1} / N={n0} = {p1 / 2**20:.0f} / {p0 / 2**20:.0f} MiB "
                           f"= {p1 / p0:.2f}x; without the returned gradients {w1 / 2**20:.0f} / "
                           f"{w0 / 2**20:.0f} MiB = {w1 / w0:.2f}x")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", help="run one case (JSON) in this process and print its result as JSON")
    ap.add_argument("--quick", action="store_true", help="N in {2048, 8192}, V = 49152 only")
    ap.add_argument("--objectives", default=",".join(OBJECTIVES))
    ap.add_argument("--paths", default="naive,fused,fused_recompute,trl")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per case")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--calibrate", action="store_true")
    ap.add_argument("--N", help="comma-separated token counts (overrides the grid's)")
    ap.add_argument("--V", help="comma-separated vocabulary sizes (overrides the grid's)")
    ap.add_argument("--reps", type=int, help="fwd+bwd repetitions per case (first one also measures memory)")
    ap.add_argument("--append", action="store_true", help="add to the cases already in --out")
    ap.add_argument("--pair", type=int, default=0,
                    help="also time the naive path this many times in each case's process, alternating")
    ap.add_argument("--table-only", action="store_true", help="print the table of --out and exit")
    args = ap.parse_args(argv)
    if args.case:
        case = json.loads(args.case)
        print(json.dumps({**case, **run_case(case)}))
        return 0
    if args.calibrate:
        calibrate()
        return 0
    paths = args.paths.split(",")
    if "trl" in paths:
        try:
            import trl.kernels  # noqa: F401
        except ImportError:
            paths.remove("trl")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = json.loads(out.read_text())["cases"] if (args.append or args.table_only) and out.exists() else []
    ints = (lambda s: [int(x) for x in s.split(",")] if s else None)
    todo = [] if args.table_only else grid(args.quick, args.objectives.split(","), paths, ints(args.N),
                                           ints(args.V), args.reps, args.pair)
    for case in todo:
        rows = [r for r in rows if not all(r.get(k) == case[k] for k in ("objective", "path", "N", "V"))]
        if "skip" in case:
            rows.append(case)
            continue
        res = _spawn(case, args.timeout)
        rows.append({**case, **res})
        shown = f"{res['seconds']:.2f}s {res['peak_bytes'] / 2**20:.0f} MiB" if "seconds" in res else res["error"]
        print(f"V={case['V']} N={case['N']} {case['objective']} {case['path']}: {shown}", file=sys.stderr, flush=True)
        out.write_text(json.dumps({"cases": rows, "torch_threads": _threads()}, indent=1))
    print(table(rows))
    print()
    print(growth(rows))
    return 0


def _threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    raise SystemExit(main())
