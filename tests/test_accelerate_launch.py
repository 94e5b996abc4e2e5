"""The recipes' own sharded path, run: `accelerate launch --config_file recipes/launch/fsdp2.yaml` with
QTargetTrainer (`qtarget.training.train`) on 2 CPU processes (gloo) equals one process on the same global
batches, for dft, psft (M = 2, pi_old on the trainer's own schedule) and target_sft with a teacher model:
per-step loss and gradient norm (the Trainer's logs) and the saved final/ weights (FULL_STATE_DICT), within
tests/test_distributed.py's tolerance. The student really is sharded: an FSDP2 module whose parameters are
DTensors, half of each held by each process.

The launch overrides two settings of the GPU yaml on the command line: `--num_processes 2` and
`--mixed_precision no` (bf16 autocast would make the two runs differ by rounding, not by sharding). The
worker (tests/accelerate_worker.py) lifts accelerate's one CPU gate (it turns only accelerator processes
into FSDP); everything else is the stock code. DeepSpeed ZeRO-3 (recipes/launch/zero3.yaml) runs when
deepspeed is installed (optional; see docs/training.md for what its CPU path needs).
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import socket
import sys
from pathlib import Path

import pytest
from packaging.version import Version
from safetensors.torch import load_file

from launch import launch_env, run_launch

HERE = Path(__file__).parent
ROOT = HERE.parent
WORKER = HERE / "accelerate_worker.py"
TOL = 1e-5  # losses and weights, as tests/test_distributed.py
# gradient norms: one float32 norm over ~3.2M gradient elements, summed per shard and then across processes
# instead of at once; measured up to 1.1e-5 relative (FSDP2), so compared to 1e-4 relative
GRAD_NORM_RTOL = 1e-4
# Below accelerate 1.15 the gradient norm of FSDP2's DTensor gradients comes back unreduced, and the Trainer
# logs rank 0's share of it (measured with accelerate 1.8.0, torch 2.9.0, transformers 5.23: 0.70-0.87 of the
# full norm; clipping still uses the full norm, the weights agree); 1.15 brought a DTensor-aware clip (1.16.0
# measured with the same torch and transformers: the full norm).
LOGS_LOCAL_NORM = Version(importlib.metadata.version("accelerate")) < Version("1.15")
OBJECTIVES = ("dft", "psft", "target_sft")


def run(cmd: list[str], out: Path, name: str, env: dict[str, str] | None = None, timeout_s: float = 300) -> dict:
    log = out.parent / f"{name}.log"
    path = [str(ROOT / "src"), str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = launch_env(PYTHONPATH=os.pathsep.join(path), **(env or {}))
    code = run_launch(cmd, ROOT, env, timeout_s, log, attempts=3, outputs=(out,))  # gloo may abort at exit
    status = f"timed out after {timeout_s:.0f} s" if code is None else f"exit code {code}"
    results = out / "results.json"
    assert code == 0 and results.exists(), f"{name}: {status}\n" + log.read_text()[-12000:]
    return json.loads(results.read_text())


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("accelerate") / "one"
    return out, run([sys.executable, str(WORKER), str(out), "4"], out, "one")


def free_port() -> int:
    """A free TCP port on loopback: accelerate launch's default, 29500, may be taken by another launch."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(config: str, tmp_path: Path, env: dict[str, str] | None = None, timeout_s: float = 300) -> tuple[Path, dict]:
    out = tmp_path / config
    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [str(accelerate), "launch", "--config_file", f"recipes/launch/{config}.yaml", "--num_processes", "2",
           "--mixed_precision", "no", "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()),
           str(WORKER), str(out), "2"]
    return out, run(cmd, out, config, env, timeout_s)


def compare(sharded: tuple[Path, dict], one: tuple[Path, dict], local_norm: bool = False) -> None:
    (out, got), (ref_out, want) = sharded, one
    assert set(got) == set(want) == set(OBJECTIVES)
    init = None
    for objective in OBJECTIVES:
        g, w = got[objective], want[objective]
        assert len(g["loss"]) == len(w["loss"]) == 3
        for step, (a, b) in enumerate(zip(g["loss"], w["loss"])):
            assert abs(a - b) <= TOL * abs(b), (objective, "loss", step, a, b)  # relative: dft's loss is ~2e-4
        for step, (a, b) in enumerate(zip(g["grad_norm"], w["grad_norm"])):
            if local_norm:  # a share of the full norm: below it
                assert 0 < a <= b * (1 + GRAD_NORM_RTOL), (objective, "grad_norm (rank 0's share)", step, a, b)
            else:
                assert abs(a - b) <= GRAD_NORM_RTOL * abs(b), (objective, "grad_norm", step, a, b)
        final = load_file(str(out / objective / "final" / "model.safetensors"))
        ref = load_file(str(ref_out / objective / "final" / "model.safetensors"))
        assert final.keys() == ref.keys()
        diff = max(float((final[k] - ref[k]).abs().max()) for k in ref)
        assert diff <= TOL, (objective, "weights", diff)
        if init is None:
            init = dict(__import__("test_train_support").tiny().state_dict())
        moved = max(float((ref[k] - init[k]).abs().max()) for k in ref)
        assert moved > 1e-2, (objective, "the three steps hardly changed the weights", moved)
    # PSFT: pi_old = the model before the first step of each group of M = 2, so the surrogate is -1 there
    psft = want["psft"]["loss"]
    assert psft[0] == pytest.approx(-1.0, abs=1e-6) and psft[2] == pytest.approx(-1.0, abs=1e-6)
    assert abs(psft[1] + 1.0) > 1e-3


def test_one_process_is_not_sharded(one_process):
    _, results = one_process
    for objective in OBJECTIVES:
        assert results[objective]["dtensor"] is False and results[objective]["local_share"] == 1.0


@pytest.mark.skipif(Version(importlib.metadata.version("accelerate")) < Version("1.8"),
                    reason="accelerate < 1.8 loads the recipe's rank-0 weights (fsdp_cpu_ram_efficient_loading) with a "
                           "hard-coded .cuda() in fsdp2_load_full_state_dict: FSDP2 from the yaml needs CUDA there")
def test_fsdp2_launch_yaml_two_processes_equal_one(tmp_path, one_process):
    sharded = launch("fsdp2", tmp_path)
    for objective in OBJECTIVES:
        r = sharded[1][objective]
        assert r["model_class"].startswith("FSDP") and r["dtensor"], (objective, r)
        assert abs(r["local_share"] - 0.5) < 1e-3, (objective, r)  # each process holds half of every parameter
    compare(sharded, one_process, local_norm=LOGS_LOCAL_NORM)


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed (optional)")
def test_zero3_launch_yaml_two_processes_equal_one(tmp_path, one_process):
    """DeepSpeed's CPU accelerator (DS_ACCELERATOR=cpu, gloo): each process holds half of every parameter
    (ds_tensor). About 100 CPU-seconds (DeepSpeed's import and three engines), minutes on a loaded box."""
    sharded = launch("zero3", tmp_path, {"DS_ACCELERATOR": "cpu"}, timeout_s=600)
    for objective in OBJECTIVES:
        assert abs(sharded[1][objective]["local_share"] - 0.5) < 1e-3, (objective, sharded[1][objective])
    compare(sharded, one_process)
