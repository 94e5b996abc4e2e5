"""The loss inside the forward (`qtarget.patch`) under sharding engines: a hand-written loop, 2-process
torchrun (gloo, CPU), equals one process on the full batch.

For DDP, FSDP2 (`fully_shard` per decoder layer + root with reshard_after_forward=True; and with
lm_head in its own unit), FSDP1 (use_orig_params True and False) and DeepSpeed ZeRO-3 (CPU accelerator,
gloo; skipped when deepspeed is not installed), three SGD steps of dft, psft
(M = 2, pi_old through the wrapped model's `qtarget_label_logprobs` pass) and target_sft with a
teacher (sharded by the same engine, except under DDP, which refuses a model without trainable
parameters) give per-step global losses and final full
parameters equal (<= 1e-5) to an unwrapped single-process run. The worker (tests/distributed_worker.py)
runs the reference on rank 0 inside the same launch; one launch per engine.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from launch import launch_env, run_launch

HERE = Path(__file__).parent
WORKER = HERE / "distributed_worker.py"
TOL = 1e-5


def launch(engine: str, tmp_path: Path, attempts: int = 3, timeout_s: float = 150.0) -> dict:
    """Run the worker under torchrun and return its results. gloo's TCP pairs can abort a process or
    stall on a loaded 2-core machine ("terminate called without an active exception", SIGABRT, even at
    exit after the results are written): a failed or stalled launch is an infrastructure failure and is
    retried, three attempts in all, each logged. A real failure fails every attempt. A stalled launch is
    killed whole after `timeout_s` (tests/launch.py)."""
    out = tmp_path / f"{engine}.json"
    log = tmp_path / f"{engine}.log"
    torchrun = Path(sys.executable).parent / "torchrun"
    code = run_launch([str(torchrun), "--standalone", "--nproc_per_node", "2", str(WORKER), engine, str(out)],
                      tmp_path, launch_env(DS_ACCELERATOR="cpu"), timeout_s, log, attempts=attempts, outputs=(out,))
    status = f"timed out after {timeout_s:.0f} s" if code is None else f"exit code {code}"
    assert code == 0 and out.exists(), f"[attempt {attempts} of {attempts}: {status}]\n" + log.read_text()[-12000:]
    return json.loads(out.read_text())


def test_a_stalled_launch_is_killed_whole(tmp_path, monkeypatch):
    """The guard itself: a worker that never finishes is killed, workers included, and the test fails
    in bounded time instead of hanging the suite."""
    stall = tmp_path / "stall_worker.py"
    stall.write_text("import os, sys, time\n"
                     "open(os.path.join(os.path.dirname(sys.argv[2]), f'pid{os.environ[\"RANK\"]}'), 'w')"
                     ".write(str(os.getpid()))\n"
                     "time.sleep(600)\n")
    monkeypatch.setattr(sys.modules[__name__], "WORKER", stall)
    with pytest.raises(AssertionError, match="timed out"):
        launch("ddp", tmp_path, attempts=1, timeout_s=20.0)
    pids = [int((tmp_path / f"pid{rank}").read_text()) for rank in (0, 1)]
    for pid in pids:  # both workers are gone (a zombie still has /proc/<pid>, but no environ to read)
        status = Path(f"/proc/{pid}/status")
        assert not status.exists() or "zombie" in status.read_text().lower() or "(dead)" in status.read_text()


def test_a_launch_that_fails_after_writing_is_retried_then_fails(tmp_path, monkeypatch):
    """A result written by a launch that then fails (as a SIGABRT at exit does) is not taken: the launch
    is repeated, and a failure on every attempt fails the test with each attempt's log."""
    failing = tmp_path / "failing_worker.py"
    failing.write_text("import json, os, sys\n"
                       "if os.environ['RANK'] == '0':\n"
                       "    open(sys.argv[2], 'w').write(json.dumps({'ok': 1}))\n"
                       "    open(os.path.join(os.path.dirname(sys.argv[2]), 'runs'), 'a').write('x')\n"
                       "sys.exit(3)\n")
    monkeypatch.setattr(sys.modules[__name__], "WORKER", failing)
    with pytest.raises(AssertionError, match=r"attempt 2 of 2: exit code 1"):
        launch("ddp", tmp_path, attempts=2, timeout_s=60.0)
    assert (tmp_path / "runs").read_text() == "xx"


CASES = {
    "ddp": ["ddp/plain"],
    "fsdp2": ["fsdp2/root_reshard", "fsdp2/head_unit"],
    "fsdp1": ["fsdp1/orig_params", "fsdp1/flat_params"],
    "zero3": ["zero3/stage3"],
}
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


@pytest.mark.parametrize("engine", [pytest.param(e, marks=pytest.mark.skipif(
    e == "zero3" and not HAS_DEEPSPEED, reason="deepspeed is not installed (optional)")) for e in CASES])
def test_two_process_engine_equals_one_process(tmp_path, engine):
    results = launch(engine, tmp_path)
    expected = {f"{case}/{obj}" for case in CASES[engine] for obj in ("dft", "psft", "target_sft")}
    assert set(results) == expected
    errors = {k: v["error"] + "\n" + v["trace"] for k, v in results.items() if "error" in v}
    assert not errors, "\n\n".join(f"{k}: {e}" for k, e in errors.items())
    for key, r in results.items():
        assert r["sharded"] == (engine != "ddp"), key  # the engine really shards the LM head
        if key.endswith("target_sft") and engine != "ddp":
            assert r["teacher_sharded"], key
        assert len(r["losses"]) == len(r["ref_losses"]) == 3
        for step, (got, want) in enumerate(zip(r["losses"], r["ref_losses"])):
            assert abs(got - want) <= TOL * max(1.0, abs(want)), (key, step, got, want)
        assert r["moved"] > 1e-2, key  # the three steps really changed the weights
        assert r["param_diff"] <= TOL, (key, r["param_diff"])
        if key.endswith("psft"):
            # pi_old = the model before the first step of each group of M = 2: the surrogate is -1 there
            assert r["losses"][0] == pytest.approx(-1.0, abs=1e-6) and r["losses"][2] == pytest.approx(-1.0, abs=1e-6)
            assert r["losses"][1] > -1.0 + 1e-4
