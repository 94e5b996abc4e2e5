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
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
WORKER = HERE / "distributed_worker.py"
TOL = 1e-5


def launch(engine: str, tmp_path: Path, attempts: int = 2) -> dict:
    """Run the worker under torchrun. A launch that dies before writing any result (gloo's TCP pairs
    can abort or stall on a loaded 2-core machine: "terminate called without an active exception")
    is an infrastructure failure and is retried once; any result written is checked as it is."""
    out = tmp_path / f"{engine}.json"
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "DS_ACCELERATOR": "cpu"}
    log = ""
    for _ in range(attempts):
        out.unlink(missing_ok=True)
        # torchrun and its workers in their own process group: a timed-out launch is killed whole (killing
        # torchrun alone would leave both workers running, orphaned)
        proc = subprocess.Popen([str(torchrun), "--standalone", "--nproc_per_node", "2", str(WORKER), engine, str(out)],
                                cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=150)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            log += "\n[attempt timed out after 150 s]"
            continue
        if out.exists():
            assert proc.returncode == 0, stdout[-3000:] + stderr[-5000:]
            return json.loads(out.read_text())
        log += stdout[-2000:] + stderr[-4000:]
    raise AssertionError(f"torchrun never produced {out.name}:{log}")


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
