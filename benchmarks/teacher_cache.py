"""Offline teacher (teacher cache) vs a live teacher, in one run:

1. target_sft step time and peak memory, student + cached top-k teacher vs student + live teacher
   3x the student's size (random Llamas on the SmolLM2 vocabulary; same batches; a step is student
   forward, fused loss, backward, SGD update; with the live teacher also its forward).
2. Bytes per supervised token on disk at k = 64 (float32 and float16 log-probs).
3. The error of k in {8, 32, 64, 256} against the live teacher on SmolLM2-135M-Instruct (teacher)
   and a perturbed copy (student), on lab demonstrations: KL(Q_cache || Q_live) and total variation
   of the implied target Q (= p - dL/dz) per token, and the relative error of the loss, per tail
   option, for target_sft (eta 0.5) and kd. Written as a table and a plot to docs/.
4. The encodings (compact, float16, float32) on SmolLM2's top-k: bytes per supervised token for k in
   {20, 64, 128, 256} on two data sets (the lab demonstrations, and CHAMP problem statements as the
   response: varied mathematical prose), and Target-SFT's (and kd's) loss and gradient read back from
   each encoding against the float32 cache, per tail option. Written to docs/teacher_cache_encoding.md.

    .venv/bin/python benchmarks/teacher_cache.py [--steps 5] [--rows 48] [--skip_smollm2] [--threads N]
    .venv/bin/python benchmarks/teacher_cache.py --only encoding      # part 4 alone

Peak memory: torch.cuda.max_memory_allocated on a GPU; on CPU the peak resident memory of a child
process per setting (Linux VmHWM above its RSS before the models were built), so one setting's peak
does not hide the other's. Times are measured in this process, interleaved, best of --steps. Not a
test: timings depend on the machine and its load.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from qtarget.data import Collator
from qtarget.data.collate import CacheRows
from qtarget.models import load_tokenizer, tiny_causal_lm
from qtarget.models.head import lm_head_of
from qtarget.objectives import get_objective
from qtarget.ops import fused_token_loss
from qtarget.ops.sparse_teacher import TAILS, TeacherTopK, dense_teacher_logprobs, topk_from_logits
from qtarget.teacher_cache import Manifest, SplitInfo, TeacherCache, build_cache
from qtarget.teacher_cache.storage import write_shard

def last_hidden_states(model, batch):
    """[B, T, H] final hidden states (the decoder's output, without the LM head)."""
    return model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).last_hidden_state


ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
KS = (8, 32, 64, 256)
STUDENT = dict(hidden_size=256, num_layers=8, num_heads=4)
TEACHER = dict(hidden_size=512, num_layers=12, num_heads=8)


# ----------------------------------------------------------------------------- data
def synthetic_rows(n: int, length: int, vocab: int, seed: int = 0) -> list[dict]:
    """Rows of `length` tokens whose second half is supervised (a prompt/response split)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        labels = [-100] * (length // 2) + ids[length // 2:]
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def models(tok):
    student = tiny_causal_lm(tok, seed=0, **STUDENT).train()
    teacher = tiny_causal_lm(tok, seed=1, **TEACHER)
    return student, teacher


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- 1. step time / memory
def make_step(student, teacher, cache: TeacherCache | None, tail: str = "student"):
    obj = get_objective("target_sft", eta=0.5)
    opt = torch.optim.SGD(student.parameters(), lr=1e-3)

    def step(batch):
        h = last_hidden_states(student, batch)
        labels = batch["labels"][:, 1:]
        kw = {}
        if cache is None:
            with torch.no_grad():
                th = last_hidden_states(teacher, batch)
            kw = dict(teacher_hidden=th[:, :-1], teacher_head=lm_head_of(teacher))
        else:  # the collator put the cached teacher in the batch (in the data loader, as in training)
            kw = dict(teacher_topk=TeacherTopK(batch["teacher_topk_ids"][:, 1:], batch["teacher_topk_logprobs"][:, 1:],
                                               batch["teacher_topk_log_tail"][:, 1:]), teacher_tail=tail)
        out = fused_token_loss(obj, h[:, :-1], lm_head_of(student), labels, **kw)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(out.loss.detach())

    return step


def batches(rows, batch_size, cache: TeacherCache | None = None):
    """Collated batches; with `cache`, carrying the cached teacher like `qtarget train`'s batches."""
    collate = Collator(0, teacher_cache=cache)
    data = CacheRows(rows)
    return [collate([data[j] for j in range(i, i + batch_size)]) for i in range(0, len(rows) - batch_size + 1, batch_size)]


def time_steps(args, tok, rows, cache_dir) -> dict[str, float]:
    student, teacher = models(tok)
    cache = TeacherCache(cache_dir)
    live, cached = make_step(student, teacher, None), make_step(student, None, cache)
    t0 = time.perf_counter()
    with_cache = batches(rows, args.batch_size, cache)
    collate_s = (time.perf_counter() - t0) / len(with_cache)
    plain = batches(rows, args.batch_size)
    best = {"live": math.inf, "cache": math.inf, "collate_cache": collate_s}
    for i in range(args.steps + 1):  # first round warms up
        for name, fn, bs in (("live", live, plain), ("cache", cached, with_cache)):
            t0 = time.perf_counter()
            fn(bs[i % len(bs)])
            dt = time.perf_counter() - t0
            if i:
                best[name] = min(best[name], dt)
    return best


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def memory_child(args) -> None:
    """Child process: one setting's peak resident memory above its resident memory once the data are
    collated (Linux: the peak is reset through /proc/self/clear_refs), printed as JSON."""
    tok = load_tokenizer("smollm2")
    rows = synthetic_rows(args.rows, args.length, len(tok))
    cache = TeacherCache(args._cache_dir) if args._memory == "cache" else None
    bs = batches(rows, args.batch_size, cache)
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (peak RSS) to the current RSS
    if cache is not None:
        step = make_step(tiny_causal_lm(tok, seed=0, **STUDENT).train(), None, cache)
    else:
        step = make_step(*models(tok), None)
    for i in range(3):
        step(bs[i % len(bs)])
    print(json.dumps({"peak_bytes": (_status_kib("VmHWM") - before) * 1024}))


def peak_memory(args, cache_dir: str) -> dict[str, float]:
    if torch.cuda.is_available():  # pragma: no cover - GPU path
        raise SystemExit("GPU memory measurement: run on CPU, or extend this benchmark to move models to CUDA")
    out = {}
    for name in ("live", "cache"):
        cmd = [sys.executable, __file__, "--_memory", name, "--_cache_dir", cache_dir, "--rows", str(args.rows),
               "--length", str(args.length), "--batch_size", str(args.batch_size)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[name] = json.loads(proc.stdout.strip().splitlines()[-1])["peak_bytes"]
    return out


def shard_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*/shard-*.safetensors"))


# ----------------------------------------------------------------------------- 3. error of k
def perturbed(model, scale: float, seed: int = 0):
    import copy

    g = torch.Generator().manual_seed(seed)
    student = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.add_(torch.randn(p.shape, generator=g) * p.std() * scale)
    return student


def implied_q(obj, z: torch.Tensor, y: torch.Tensor, teacher_logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q [n, V], per-token loss [n]) of `obj` with c = 1: Q = p - dL/dz."""
    from qtarget.objectives.base import TokenInputs

    z = z.detach().requires_grad_(True)
    terms = obj.terms(TokenInputs(logits=z, labels=y, teacher_logits=teacher_logp))
    (g,) = torch.autograd.grad(terms.loss.sum(), z)
    return (torch.softmax(z.detach(), -1) - g), terms.loss.detach()


def k_error(args) -> list[dict]:
    from qtarget.data import prepare_data
    from qtarget.lab.tasks import demonstrations, shop_problems
    from qtarget.models import load_smollm2

    teacher, tok = load_smollm2()
    teacher.eval()
    student = perturbed(teacher, args.perturb).eval()
    rows = demonstrations(shop_problems(args.error_rows, seed=11), noise=0.0, seed=11)
    data = prepare_data([{"prompt": r["prompt"], "response": r["response"]} for r in rows], tok, max_length=256,
                        chat_template=True)
    from qtarget.data import Collator

    batch = Collator(tok.pad_token_id)(data.train.examples)
    with torch.no_grad():
        hs = last_hidden_states(student, batch)[:, :-1]
        ht = last_hidden_states(teacher, batch)[:, :-1]
    mask = batch["labels"][:, 1:] != -100
    hs, ht, y = hs[mask], ht[mask], batch["labels"][:, 1:][mask]
    s_head, t_head = lm_head_of(student).detached(), lm_head_of(teacher).detached()
    objectives = {"target_sft": get_objective("target_sft", eta=0.5), "kd": get_objective("kd")}
    sums: dict[tuple, dict[str, float]] = {}
    n = hs.shape[0]
    print(f"[k error] {n} supervised tokens, V = {t_head.rows}, student = teacher with {args.perturb:g} x std "
          f"Gaussian noise on its matrices")
    for a in range(0, n, args.error_chunk):
        z = s_head.logits(hs[a:a + args.error_chunk])
        t = t_head.logits(ht[a:a + args.error_chunk])
        yc = y[a:a + args.error_chunk]
        for oname, obj in objectives.items():
            q_live, loss_live = implied_q(obj, z, yc, t)
            for k in KS:
                topk = topk_from_logits(t, k)
                for tail in TAILS:
                    dense = dense_teacher_logprobs(topk.ids, topk.logprobs, topk.log_tail, z, tail)
                    q, loss = implied_q(obj, z, yc, dense)
                    q64, l64 = q.double().clamp_min(0), q_live.double().clamp_min(1e-300)
                    kl = torch.where(q64 > 0, q64 * (q64.log() - l64.log()), 0.0).sum(-1)
                    tv = 0.5 * (q.double() - q_live.double()).abs().sum(-1)
                    s = sums.setdefault((oname, k, tail), {"kl": 0.0, "tv": 0.0, "loss": 0.0, "loss_live": 0.0})
                    s["kl"] += float(kl.sum())
                    s["tv"] += float(tv.sum())
                    s["loss"] += float(loss.double().sum())
                    s["loss_live"] += float(loss_live.double().sum())
    out = []
    for (oname, k, tail), s in sums.items():
        out.append({"objective": oname, "k": k, "tail": tail, "kl_q": s["kl"] / n, "tv_q": s["tv"] / n,
                    "loss_rel_err": abs(s["loss"] - s["loss_live"]) / abs(s["loss_live"]), "tokens": n})
    return out


def write_error_docs(results: list[dict]) -> None:
    from matplotlib.figure import Figure

    lines = ["| objective | tail | k | KL(Q_cache ‖ Q_live) | TV(Q_cache, Q_live) | loss rel. error |",
             "|---|---|---:|---:|---:|---:|"]
    for r in sorted(results, key=lambda r: (r["objective"], TAILS.index(r["tail"]), r["k"])):
        lines.append(f"| {r['objective']} | {r['tail']} | {r['k']} | {r['kl_q']:.2e} | {r['tv_q']:.2e} | "
                     f"{r['loss_rel_err']:.2e} |")
    table = "\n".join(lines)
    print(table)
    (DOCS / "teacher_cache_k_error.md").write_text(
        f"<!-- written by benchmarks/teacher_cache.py; {results[0]['tokens']} supervised tokens -->\n{table}\n")
    fig = Figure(figsize=(13, 3.8))
    axes = fig.subplots(1, 3)
    for ax, metric, title in zip(axes, ("kl_q", "tv_q", "loss_rel_err"),
                                 ("KL(Q_cache || Q_live) per token", "TV(Q_cache, Q_live) per token",
                                  "relative error of the loss")):
        for oname, style in (("target_sft", "-"), ("kd", "--")):
            for tail in TAILS:
                pts = sorted((r["k"], r[metric]) for r in results if r["objective"] == oname and r["tail"] == tail)
                ax.plot([p[0] for p in pts], [max(p[1], 1e-12) for p in pts], style, marker="o",
                        label=f"{oname}, {tail}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(KS, [str(k) for k in KS])
        ax.set_xlabel("k")
        ax.set_title(title, fontsize=10)
    axes[0].legend(fontsize=7)
    fig.suptitle("Teacher cache: error of the top-k teacher vs the live teacher (SmolLM2-135M-Instruct)", fontsize=11)
    fig.tight_layout()
    fig.savefig(DOCS / "teacher_cache_k_error.png", dpi=110)
    print(f"wrote {DOCS / 'teacher_cache_k_error.png'} and {DOCS / 'teacher_cache_k_error.md'}")


# ----------------------------------------------------------------------------- 4. encodings
ENC_KS = (20, 64, 128, 256)
ENCODINGS = ("compact", "float16", "float32")


def encoding_data(tok, name: str, n_rows: int):
    """Tokenised rows of one data set: the lab demonstrations (as part 3) or CHAMP problem statements."""
    from qtarget.data import prepare_data
    from qtarget.lab.tasks import demonstrations, shop_problems

    if name == "lab":
        rows = [{"prompt": r["prompt"], "response": r["response"]}
                for r in demonstrations(shop_problems(n_rows, seed=11), noise=0.0, seed=11)]
    else:
        from qtarget.evaluation.benchmarks import load_benchmark

        rows = [{"prompt": "State a competition problem.", "response": p.question}
                for p in load_benchmark("champ")[:n_rows]]
    return prepare_data(rows, tok, max_length=256, chat_template=True).train.examples


def topk_rows(teacher, student, tok, examples, k_max: int, chunk: int):
    """Per supervised token (row-major): teacher top-k_max, the teacher's full log-softmax is not kept;
    returns positions, row counts, per-k TeacherTopK for ENC_KS, the student's hidden states, labels."""
    from qtarget.data import Collator

    batch = Collator(tok.pad_token_id)(examples)
    with torch.no_grad():
        hs = last_hidden_states(student, batch)[:, :-1]
        ht = last_hidden_states(teacher, batch)[:, :-1]
    mask = batch["labels"][:, 1:] != -100
    where = mask.nonzero()
    counts = torch.bincount(where[:, 0], minlength=len(examples))
    t_head = lm_head_of(teacher).detached()
    parts = {k: [] for k in ENC_KS}
    ht = ht[mask]
    for a in range(0, ht.shape[0], chunk):
        logits = t_head.logits(ht[a:a + chunk])
        for k in ENC_KS:
            parts[k].append(topk_from_logits(logits, k))
    topk = {k: TeacherTopK(torch.cat([p.ids for p in v]), torch.cat([p.logprobs for p in v]),
                           torch.cat([p.log_tail for p in v])) for k, v in parts.items()}
    return where[:, 1] + 1, counts, topk, hs[mask], batch["labels"][:, 1:][mask]


def write_one_shard(folder: Path, tok, examples, positions, counts, topk: TeacherTopK, encoding: str) -> Path:
    """A one-shard cache of `topk` in `encoding`, written by the cache's own writer."""
    from qtarget.teacher_cache.schema import LOGPROB_DTYPES, data_fingerprint, id_dtype, row_fingerprint, tokenizer_fingerprint

    V = len(tok)
    fps = [row_fingerprint(ex) for ex in examples]
    m = Manifest(teacher={"name": "smollm2", "revision": None, "weights": "-"}, tokenizer_fingerprint=tokenizer_fingerprint(tok),
                 vocab_size=V, top_k=topk.k, temperature=1.0, logprob_dtype=encoding, rows_per_shard=len(examples),
                 splits={"train": SplitInfo(len(examples), int(counts.sum()), data_fingerprint(fps))})
    m.save(folder)
    offsets = torch.zeros(len(examples) + 1, dtype=torch.int64)
    offsets[1:] = counts.cumsum(0)
    tensors = {"row_index": torch.arange(len(examples)), "row_fingerprint": torch.tensor(fps, dtype=torch.int64),
               "row_offsets": offsets, "positions": positions.to(torch.int32), "ids": topk.ids.to(id_dtype(V)),
               "logprobs": topk.logprobs.to(LOGPROB_DTYPES.get(encoding, torch.float32)), "log_tail": topk.log_tail}
    return write_shard(folder, "train", 0, tensors, m.digest(), encoding=m.encoding)


def read_back(folder: Path) -> TeacherTopK:
    cache = TeacherCache(folder)
    rows = [cache.row("train", i).topk for i in range(cache.manifest.splits["train"].rows)]
    return TeacherTopK(torch.cat([r.ids for r in rows]), torch.cat([r.logprobs for r in rows]),
                       torch.cat([r.log_tail for r in rows]))


def loss_and_grads(obj, z_all, y, h, topk: TeacherTopK, tail: str, chunk: int):
    """Summed loss, logit gradient [n, V] and LM-head weight gradient [V, H] (float64) of `obj` over
    the tokens, with the sparse teacher rebuilt by `tail` (as the engine does)."""
    from qtarget.objectives.base import TokenInputs

    loss, gz, gw = 0.0, [], 0
    for a in range(0, z_all.shape[0], chunk):
        z = z_all[a:a + chunk].detach().requires_grad_(True)
        dense = dense_teacher_logprobs(topk.ids[a:a + chunk], topk.logprobs[a:a + chunk], topk.log_tail[a:a + chunk],
                                       z.detach(), tail)
        terms = obj.terms(TokenInputs(logits=z, labels=y[a:a + chunk], teacher_logits=dense))
        (g,) = torch.autograd.grad(terms.loss.sum(), z)
        loss += float(terms.loss.double().sum())
        gz.append(g.double())
        gw = gw + g.double().T @ h[a:a + chunk].double()
    return loss, torch.cat(gz), gw


def encoding_error(args) -> tuple[list[dict], list[dict]]:
    from qtarget.models import load_smollm2

    teacher, tok = load_smollm2()
    teacher.eval()
    student = perturbed(teacher, args.perturb).eval()
    s_head = lm_head_of(student).detached()
    objectives = {"target_sft": get_objective("target_sft", eta=0.5), "kd": get_objective("kd")}
    sizes, errors = [], []
    for data_name, n_rows in (("lab", args.error_rows), ("champ", args.champ_rows)):
        examples = encoding_data(tok, data_name, n_rows)
        positions, counts, topk, h, y = topk_rows(teacher, student, tok, examples, max(ENC_KS), args.error_chunk)
        n = int(counts.sum())
        z = torch.cat([s_head.logits(h[a:a + args.error_chunk]) for a in range(0, n, args.error_chunk)])
        print(f"[encoding] {data_name}: {len(examples)} rows, {n} supervised tokens")
        with tempfile.TemporaryDirectory() as tmp:
            for k in ENC_KS:
                back = {}
                for enc in ENCODINGS:
                    path = write_one_shard(Path(tmp) / f"{enc}-{k}", tok, examples, positions, counts, topk[k], enc)
                    sizes.append({"data": data_name, "k": k, "encoding": enc, "bytes": path.stat().st_size / n, "tokens": n})
                    back[enc] = read_back(Path(tmp) / f"{enc}-{k}")
                if k != 64 and data_name != "lab":
                    continue
                for oname, obj in objectives.items():
                    for tail in TAILS if k == 64 else ("student",):
                        ref = loss_and_grads(obj, z, y, h, back["float32"], tail, args.error_chunk)
                        for enc in ("compact", "float16"):
                            got = loss_and_grads(obj, z, y, h, back[enc], tail, args.error_chunk)
                            errors.append({"data": data_name, "k": k, "encoding": enc, "objective": oname, "tail": tail,
                                           "loss": abs(got[0] - ref[0]) / abs(ref[0]),
                                           "grad_logits": float((got[1] - ref[1]).norm() / ref[1].norm()),
                                           "grad_head": float((got[2] - ref[2]).norm() / ref[2].norm()),
                                           "grad_token_max": float(((got[1] - ref[1]).norm(dim=1)
                                                                    / ref[1].norm(dim=1).clamp_min(1e-30)).max())})
                            print(f"  {data_name} k={k} {enc} {oname} {tail}: {errors[-1]}", flush=True)
    return sizes, errors


def write_encoding_docs(sizes: list[dict], errors: list[dict]) -> None:
    lines = ["| data | k | " + " | ".join(f"{e} (B/token)" for e in ENCODINGS) + " | compact / float32 |",
             "|---|---:|" + "---:|" * (len(ENCODINGS) + 1)]
    for data_name in ("lab", "champ"):
        for k in ENC_KS:
            b = {r["encoding"]: r["bytes"] for r in sizes if r["data"] == data_name and r["k"] == k}
            lines.append(f"| {data_name} | {k} | " + " | ".join(f"{b[e]:.1f}" for e in ENCODINGS)
                         + f" | {b['compact'] / b['float32']:.2f} |")
    lines += ["", "| data | k | encoding | objective | tail | loss rel. error | logit-gradient rel. error (Frobenius) "
              "| LM-head gradient rel. error | worst token's gradient rel. error |", "|---|---:|---|---|---|---:|---:|---:|---:|"]
    for r in errors:
        lines.append(f"| {r['data']} | {r['k']} | {r['encoding']} | {r['objective']} | {r['tail']} | {r['loss']:.1e} | "
                     f"{r['grad_logits']:.1e} | {r['grad_head']:.1e} | {r['grad_token_max']:.1e} |")
    table = "\n".join(lines)
    print(table)
    tokens = {r["data"]: r["tokens"] for r in sizes}
    (DOCS / "teacher_cache_encoding.md").write_text(
        f"<!-- written by benchmarks/teacher_cache.py --only encoding; supervised tokens: {tokens} -->\n{table}\n")
    print(f"wrote {DOCS / 'teacher_cache_encoding.md'}")


# ----------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rows", type=int, default=24)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--batch_size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip_smollm2", action="store_true", help="skip part 3 (loads the real SmolLM2)")
    ap.add_argument("--error_rows", type=int, default=24)
    ap.add_argument("--error_chunk", type=int, default=128)
    ap.add_argument("--perturb", type=float, default=0.1, help="student = teacher + this x std noise per matrix")
    ap.add_argument("--champ_rows", type=int, default=60, help="part 4: CHAMP problem statements")
    ap.add_argument("--only", choices=("encoding",), default=None, help="run one part alone")
    ap.add_argument("--_memory", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_cache_dir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args._memory:
        memory_child(args)
        return
    if args.only == "encoding":
        write_encoding_docs(*encoding_error(args))
        return

    tok = load_tokenizer("smollm2")
    student, teacher = models(tok)
    print(f"student {n_params(student) / 1e6:.1f}M params, teacher {n_params(teacher) / 1e6:.1f}M "
          f"({n_params(teacher) / n_params(student):.2f}x); V = {len(tok)}; batches of {args.batch_size} x "
          f"{args.length} tokens, half supervised; target_sft eta 0.5, tail 'student', k = 64")
    rows = synthetic_rows(args.rows, args.length, len(tok))
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        build_cache(teacher, tok, rows, Path(tmp) / "k64", top_k=64, batch_size=args.batch_size, progress=False,
                    logprob_dtype="float32")
        build_s = time.perf_counter() - t0
        build_cache(teacher, tok, rows, Path(tmp) / "k64_f16", top_k=64, batch_size=args.batch_size,
                    logprob_dtype="float16", progress=False)
        build_cache(teacher, tok, rows, Path(tmp) / "k64_compact", top_k=64, batch_size=args.batch_size,
                    logprob_dtype="compact", progress=False)
        n_sup = sum(sum(1 for t in r["labels"][1:] if t != -100) for r in rows)
        b32, b16 = shard_bytes(Path(tmp) / "k64") / n_sup, shard_bytes(Path(tmp) / "k64_f16") / n_sup
        bc = shard_bytes(Path(tmp) / "k64_compact") / n_sup
        times = time_steps(args, tok, rows, Path(tmp) / "k64")
        mem = peak_memory(args, str(Path(tmp) / "k64"))
    print("\n| measure | live teacher | teacher cache (k=64) | ratio cache/live |\n|---|---:|---:|---:|")
    print(f"| target_sft step time (best of {args.steps}) | {times['live'] * 1e3:.0f} ms | {times['cache'] * 1e3:.0f} ms "
          f"| {times['cache'] / times['live']:.2f}x |")
    print(f"| peak memory (models, activations, loss) | {mem['live'] / 2**20:.0f} MiB | {mem['cache'] / 2**20:.0f} MiB "
          f"| {mem['cache'] / mem['live']:.2f}x |")
    print(f"(collating a batch with the cache, done by the data loader: {times['collate_cache'] * 1e3:.0f} ms)")
    print(f"\nbytes per supervised token on disk at k=64: {b32:.0f} B (float32 log-probs), {b16:.0f} B (float16) "
          f"[goal <= 400 B: {b32 / 400:.2f}x / {b16 / 400:.2f}x of it]; cache build {build_s:.1f} s for {n_sup} tokens")
    print(f"compact encoding with this random teacher (near-uniform top-k over random ids: its worst case): {bc:.0f} B; "
          f"a trained teacher's: part 4")
    if not args.skip_smollm2:
        write_error_docs(k_error(args))
        write_encoding_docs(*encoding_error(args))


if __name__ == "__main__":
    main()
