"""scripts/gpu_check.sh's logic on a machine without CUDA: the message and summary when there is no
GPU, and, with a stand-in python that claims one, how step results, failures, skips and the time budget
reach the summary table and the exit status."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
STEPS = ("cuda_tests", "vllm_local", "cuda_engine", "trl_dropin")


def run(tmp_path, *args, **env):
    env = {**os.environ, "GPU_CHECK_LOG_DIR": str(tmp_path / "logs"), **env}
    env.pop("OUT", None)
    proc = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=300)
    return proc, proc.stdout + proc.stderr


def rows(tmp_path) -> dict[str, list[str]]:
    lines = (tmp_path / "logs" / "summary.md").read_text().splitlines()[2:]
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines)}


def fake_python(tmp_path, probe: str, rc: int) -> str:
    """A python that answers the script's probe (read from stdin) with `probe` and exits `rc` otherwise."""
    path = tmp_path / "python"
    path.write_text(f'#!/usr/bin/env bash\nif [ "$1" = - ]; then cat > /dev/null; echo "{probe}"; exit 0; fi\n'
                    f'echo "stand-in python: $*"; exit {rc}\n')
    path.chmod(0o755)
    return str(path)


def test_list_names_every_step(tmp_path):
    proc, out = run(tmp_path, "--list")
    assert proc.returncode == 0 and [line.split()[0] for line in out.splitlines()] == list(STEPS)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_without_cuda_it_says_so_and_prints_the_summary(tmp_path):
    proc, out = run(tmp_path)
    assert proc.returncode == 0, out
    assert "no CUDA device here" in out and "nothing to check" in out
    assert rows(tmp_path) == {s: ["skipped", "-", "no CUDA device"] for s in STEPS}
    assert "| cuda_tests | skipped | - | no CUDA device |" in out  # the table is printed too


def test_a_failing_step_fails_the_run_and_a_missing_trl_skips_its_benchmark(tmp_path):
    py = fake_python(tmp_path, "cuda=1 torch 9.9, CUDA device: stand-in; trl no", rc=3)
    proc, out = run(tmp_path, GPU_CHECK_PYTHON=py)
    assert proc.returncode == 1, out
    table = rows(tmp_path)
    for s in ("cuda_tests", "vllm_local", "cuda_engine"):
        assert table[s][0] == "FAIL" and table[s][2].startswith("exit 3"), table[s]
    assert table["trl_dropin"][0] == "skipped" and "trl is not importable" in table["trl_dropin"][2]
    assert "stand-in python: -m pytest -p no:cacheprovider -q tests/test_cuda_engine.py" in \
        (tmp_path / "logs" / "cuda_tests.log").read_text()


def test_passing_steps_and_the_time_budget(tmp_path):
    py = fake_python(tmp_path, "cuda=1 torch 9.9, CUDA device: stand-in; trl yes", rc=0)
    proc, out = run(tmp_path, GPU_CHECK_PYTHON=py, GPU_CHECK_STEPS="cuda_engine,trl_dropin")
    assert proc.returncode == 0, out
    assert [r[0] for r in rows(tmp_path).values()] == ["PASS", "PASS"] and list(rows(tmp_path)) == ["cuda_engine",
                                                                                                   "trl_dropin"]
    proc, out = run(tmp_path, GPU_CHECK_PYTHON=py, GPU_CHECK_BUDGET_S="5")
    assert proc.returncode == 0 and all(r[:1] == ["not run"] and "budget of 5s spent" in r[2]
                                        for r in rows(tmp_path).values()), out


def test_an_unknown_step_is_refused(tmp_path):
    proc, out = run(tmp_path, GPU_CHECK_STEPS="cuda_tests,kernels")
    assert proc.returncode == 2 and "unknown step 'kernels'" in out
