"""The torch-only core (DESIGN: "a test that blocks the HF stack keeps it so").

In a subprocess whose imports of the Hugging Face stack, plots and answer checking (transformers,
accelerate, datasets, peft, huggingface_hub, tokenizers, yaml, tqdm, matplotlib, sympy, trl) raise
ModuleNotFoundError, as they do in an install without extras:
- the objectives (`token_loss`), the fused engine (`fused_token_loss`), `implied_target` and the
  teacher-cache reader import, and agree with each other and with the float64 formulas of
  tests/objective_formulas.py (loss, gradients, Q and c; the cached top-k with the dense teacher);
- `qtarget --help`, `qtarget objectives` and `qtarget inspect` run; `qtarget train` (lab, eval,
  teacher-cache, profile, inspect --plot) and `qtarget.patch` fail with one line naming the extra.
scripts/test_floors.sh (stage torch-only) runs this file in a venv with torch alone and qtarget
installed without extras.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKED = ("transformers", "accelerate", "datasets", "peft", "huggingface_hub", "tokenizers", "yaml", "tqdm",
           "matplotlib", "sympy", "math_verify", "trl")

BLOCKER = textwrap.dedent(f"""
    import importlib.abc, sys
    BLOCKED = {BLOCKED!r}

    class _NotInstalled(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
            return None

    sys.meta_path.insert(0, _NotInstalled())
""")

# Runs in the blocked subprocess; prints {"checks": {name: [error, tolerance]}, "loaded": [...]}.
NUMERIC = textwrap.dedent("""
    import json, math, tempfile
    from pathlib import Path
    import torch
    import qtarget
    from qtarget.ops.sparse_teacher import TeacherTopK
    from qtarget.teacher_cache import TeacherCache
    from qtarget.teacher_cache.manifest import Manifest, SplitInfo
    from qtarget.teacher_cache.schema import data_fingerprint, id_dtype, row_fingerprint
    from qtarget.teacher_cache.storage import write_shard
    from objective_formulas import CATALOGUE_PARAMS, expected_loss, expected_target, flat_supervised, make_case

    checks = {}

    def err(a, b):
        a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
        return float(((a - b).abs() / (1 + b.abs())).max()) if a.numel() else 0.0

    def check(name, a, b, tol):
        checks[name] = [err(a, b), tol]

    for i, (name, params) in enumerate(CATALOGUE_PARAMS.items()):
        objective = qtarget.get_objective(name, **params)
        z, y, aux = make_case((3, 5, 41), seed=100 + i)
        zf, yf, auxf = flat_supervised(z, y, aux)
        # the objectives: the full-logits path against the float64 formula
        res = qtarget.token_loss(objective, z, y, reduction="sum", **aux)
        check(f"{name}/token_loss", res.loss, expected_loss(name, params, zf, yf, auxf).sum(), 1e-4)
        # implied_target against the SPEC's gamma and residual
        Q, c = qtarget.implied_target(objective, z, y, return_scale=True, **aux)
        Q_want, c_want = expected_target(name, params, zf, yf, auxf)
        check(f"{name}/implied_target", Q[y != -100], Q_want, 1e-4)
        check(f"{name}/implied_scale", c[y != -100], c_want, 1e-5)
        # the fused engine against the full-logits path: loss and gradients of hidden and head
        g = torch.Generator().manual_seed(i)
        hidden = torch.randn(3, 5, 16, generator=g).requires_grad_(True)
        weight = (torch.randn(41, 16, generator=g) * 0.5).requires_grad_(True)
        fused = qtarget.fused_token_loss(objective, hidden, weight, y, chunk_size=4, **aux)
        grads = torch.autograd.grad(fused.loss, (hidden, weight))
        full = qtarget.token_loss(objective, hidden @ weight.T, y, **aux)
        want = torch.autograd.grad(full.loss, (hidden, weight))
        check(f"{name}/fused_loss", fused.loss, full.loss, 1e-5)
        check(f"{name}/fused_grad_hidden", grads[0], want[0], 1e-5)
        check(f"{name}/fused_grad_head", grads[1], want[1], 1e-5)

    # the teacher-cache reader: shards written here from a dense teacher, read back, trained on
    B, T, V, H, k = 3, 6, 37, 16, 5
    g = torch.Generator().manual_seed(7)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, 0] = -100
    labels[0, 3] = -100
    teacher_logits = torch.randn(B, T, V, generator=g) * 3
    rows = [{"input_ids": labels[b].clamp_min(0).tolist(), "labels": labels[b].tolist()} for b in range(B)]
    logp_t = torch.log_softmax(teacher_logits.double(), -1)  # pi_T at temperature 1
    top = logp_t.topk(k, -1)
    sup = [[t for t in range(T) if labels[b, t] != -100] for b in range(B)]
    manifest = Manifest(teacher={"name": "dense", "weights": "test"}, tokenizer_fingerprint="none", vocab_size=V,
                        top_k=k, temperature=1.0, logprob_dtype="float32", rows_per_shard=2,
                        splits={"train": SplitInfo(rows=B, supervised_tokens=sum(map(len, sup)),
                                                   data_fingerprint=data_fingerprint(map(row_fingerprint, rows)))})
    folder = Path(tempfile.mkdtemp())
    manifest.save(folder)
    for shard, start in enumerate(range(0, B, 2)):
        bs = range(start, min(B, start + 2))
        pos = [(b, t) for b in bs for t in sup[b]]
        ids = torch.stack([top.indices[b, t] for b, t in pos])
        lps = torch.stack([top.values[b, t] for b, t in pos])
        counts = torch.tensor([0] + [len(sup[b]) for b in bs])
        write_shard(folder, "train", shard, {
            "row_index": torch.tensor(list(bs)), "row_fingerprint": torch.tensor([row_fingerprint(rows[b]) for b in bs]),
            "row_offsets": counts.cumsum(0), "positions": torch.tensor([t for _, t in pos], dtype=torch.int32),
            "ids": ids.to(id_dtype(V)), "logprobs": lps.float(),
            "log_tail": torch.log1p(-lps.exp().sum(-1)).float()}, manifest.digest())
    cache = TeacherCache(folder)
    cache.check_rows("train", rows)
    batch = cache.batch(["train"] * B, list(range(B)), labels)
    mask = labels != -100
    check("cache/ids", batch["teacher_topk_ids"][mask], top.indices[mask], 0.0)
    check("cache/logprobs", batch["teacher_topk_logprobs"][mask], top.values[mask], 1e-6)
    check("cache/log_tail", batch["teacher_topk_log_tail"][mask], torch.log1p(-top.values.exp().sum(-1))[mask], 1e-6)
    topk = TeacherTopK(batch["teacher_topk_ids"], batch["teacher_topk_logprobs"], batch["teacher_topk_log_tail"])
    # "renormalize": pi_T restricted to the top-k, as dense logits (-inf elsewhere)
    dense = torch.full((B, T, V), -math.inf).scatter(-1, top.indices, top.values.float())
    hidden = torch.randn(B, T, H, generator=g).requires_grad_(True)
    weight = (torch.randn(V, H, generator=g) * 0.5).requires_grad_(True)
    for name in ("target_sft", "kd", "distill_hybrid"):
        params = CATALOGUE_PARAMS[name]
        objective = qtarget.get_objective(name, **params)
        fused = qtarget.fused_token_loss(objective, hidden, weight, labels, teacher_topk=topk,
                                         teacher_tail="renormalize", reduction="sum", chunk_size=5)
        gh = torch.autograd.grad(fused.loss, hidden)[0]
        full = qtarget.token_loss(objective, hidden @ weight.T, labels, teacher_logits=dense, reduction="sum")
        want_gh = torch.autograd.grad(full.loss, hidden)[0]
        zf, yf, auxf = flat_supervised((hidden @ weight.T).detach(), labels, {"teacher_logits": dense})
        check(f"cache/{name}/fused_vs_formula", fused.loss, expected_loss(name, params, zf, yf, auxf).sum(), 1e-4)
        check(f"cache/{name}/fused_vs_token_loss", fused.loss, full.loss, 1e-5)
        check(f"cache/{name}/grad_hidden", gh, want_gh, 1e-5)

    # the names outside the core say which extra they need
    try:
        qtarget.patch
        checks["patch_message"] = "no error"
    except ImportError as e:
        checks["patch_message"] = str(e)
    print(json.dumps({"checks": checks, "loaded": sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)}))
""")


def run_blocked(code: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")]),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", BLOCKER + code, *args], capture_output=True, text=True, env=env,
                          cwd=cwd or ROOT, timeout=300)


def test_the_core_runs_and_agrees_without_the_hf_stack():
    proc = run_blocked(NUMERIC)
    assert proc.returncode == 0, proc.stderr[-6000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["loaded"] == [], f"the core imported {out['loaded']}"
    checks = out.pop("checks")
    message = checks.pop("patch_message")
    assert message.startswith("qtarget.patch needs the 'patch' extra: pip install 'qtarget[patch]'"), message
    assert len(checks) >= 20 * 6 + 3 + 9
    bad = {name: value for name, value in checks.items() if not value[0] <= value[1]}
    assert not bad, f"core paths disagree ([error, tolerance]): {bad}"


# Runs `qtarget.cli.main` on each argv (JSON lists in sys.argv[1:]) in one blocked process; prints
# [[exit code, stdout, stderr], ...].
CLI = textwrap.dedent("""
    import contextlib, io, json, sys
    from qtarget.cli import main
    results = []
    for argv in map(json.loads, sys.argv[1:]):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
        results.append([code, out.getvalue(), err.getvalue()])
    print(json.dumps(results))
""")

NEEDS_AN_EXTRA = [
    (["train", "--config", "x.yaml"], "hf", "yaml"),
    (["train", "--help"], "hf", "yaml"),
    (["teacher-cache", "--help"], "hf", None),
    (["profile", "--help"], "hf", None),
    (["eval", "--help"], "eval", None),
    (["lab", "--help"], "lab", None),
    (["inspect", "dft", "--plot", "p.png"], "plots", "matplotlib"),
]


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """(folder, {argv as a tuple: (exit code, stdout, stderr)}) for every command below, in one process."""
    folder = tmp_path_factory.mktemp("cli")
    argvs = [a for a, _, _ in NEEDS_AN_EXTRA] + [["--help"], ["objectives"],
                                                   ["inspect", "dft", "sft", "--json", str(folder / "q.json")]]
    proc = run_blocked(CLI, *map(json.dumps, argvs), cwd=folder)
    assert proc.returncode == 0, proc.stderr[-6000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    return folder, {tuple(a): tuple(r) for a, r in zip(argvs, results)}


@pytest.mark.parametrize("argv, extra, module", NEEDS_AN_EXTRA)
def test_a_command_needing_an_extra_says_which_in_one_line(argv, extra, module, cli_runs):
    folder, runs = cli_runs
    code, _, err = runs[tuple(argv)]
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    want = f"qtarget {argv[0]}: error: needs the '{extra}' extra: pip install 'qtarget[{extra}]' (module '"
    assert lines[0].startswith(want), lines[0]
    if module:
        assert lines[0].endswith(f"(module '{module}' is not installed)"), lines[0]
    assert not (folder / "p.png").exists()


def test_the_core_commands_run_without_the_hf_stack(cli_runs):
    folder, runs = cli_runs
    code, out, err = runs[("--help",)]
    assert code == 0 and "train" in out, err
    code, out, err = runs[("objectives",)]
    assert code == 0, err
    listed = [line.split()[0] for line in out.splitlines() if line.strip()]
    assert {"sft", "dft", "psft", "target_sft", "target"} <= set(listed)
    code, out, err = runs[("inspect", "dft", "sft", "--json", str(folder / "q.json"))]
    assert code == 0, err
    result = json.loads((folder / "q.json").read_text())
    p, y = result["p"], result["label"]
    dft, sft = result["rows"]
    # SFT's target is the label (Q = delta_y); DFT's gradient is p_y (p - delta_y): Q = p - p_y (p - delta_y)
    assert sft["name"] == "sft" and dft["name"] == "dft"
    assert max(abs(q - (v == y)) for v, q in enumerate(sft["Q"])) < 1e-5
    want = [p[v] - p[y] * (p[v] - (v == y)) for v in range(len(p))]
    assert max(abs(q - w) for q, w in zip(dft["Q"], want)) < 1e-5


@pytest.mark.skipif(importlib.util.find_spec("transformers") is not None,
                    reason="a real install without the 'hf' extra (scripts/test_floors.sh torch-only)")
def test_the_console_script_names_the_extra_in_a_torch_only_install(tmp_path):
    script = Path(sys.executable).parent / "qtarget"
    proc = subprocess.run([str(script), "train", "--config", "x.yaml"], capture_output=True, text=True, cwd=tmp_path,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("qtarget train: error: needs the 'hf' extra: pip install 'qtarget[hf]'")
    assert len(proc.stderr.strip().splitlines()) == 1
