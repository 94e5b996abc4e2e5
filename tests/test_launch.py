"""The launcher of the multi-process tests (tests/launch.py): a failed attempt is repeated with its
outputs removed first, every attempt is logged, and a real failure is reported after the last one.
(That a stalled torchrun launch is killed whole, workers included, is tested in test_distributed.py.)"""
from __future__ import annotations

import sys
from pathlib import Path

from launch import launch_env, run_launch

# fails (exit 3) on its first run only; refuses to run over an earlier run's output folder
FLAKY = """
import pathlib, sys
count = pathlib.Path("count")
n = int(count.read_text()) if count.exists() else 0
count.write_text(str(n + 1))
out = pathlib.Path("out")
if out.exists():
    sys.exit("out/ left by an earlier attempt")
out.mkdir()
(out / "done").write_text("yes")
sys.exit(0 if n >= 1 else 3)
"""


def test_a_failed_launch_is_retried_with_fresh_outputs(tmp_path):
    log = tmp_path / "run.log"
    code = run_launch([sys.executable, "-c", FLAKY], tmp_path, launch_env(), 60, log, attempts=3,
                      outputs=(tmp_path / "out",))
    assert code == 0
    assert (tmp_path / "count").read_text() == "2" and (tmp_path / "out" / "done").read_text() == "yes"
    assert log.read_text().count("=== attempt") == 2


def test_a_real_failure_fails_every_attempt(tmp_path):
    log = tmp_path / "run.log"
    code = run_launch([sys.executable, "-c", FLAKY], tmp_path, launch_env(), 60, log, attempts=3)  # out/ kept
    assert code == 1  # attempt 1: exit 3; attempts 2 and 3: out/ exists -> sys.exit(message) = 1
    text = log.read_text()
    lines = text.splitlines()
    assert text.count("=== attempt") == 3 and lines.count("out/ left by an earlier attempt") == 2
    assert Path(tmp_path / "count").read_text() == "3"
