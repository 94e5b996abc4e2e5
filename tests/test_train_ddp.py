"""2-process CPU data parallel (torchrun, gloo) ends with the same parameters as one process with the
same global batch: the loss normaliser counts the supervised tokens of all ranks."""
from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
from safetensors.torch import load_file

from launch import launch_env, run_launch

WORKER = textwrap.dedent('''
    import sys, torch
    sys.path.insert(0, {tests!r})
    from qtarget.data import prepare_data
    from qtarget.training import train
    from test_train_support import config, tiny, tokenizer, toy_rows

    out, per_device, objective = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    tok = tokenizer()
    data = prepare_data(toy_rows(16), tok, max_length=64)
    extra = dict(ddp_backend="gloo") if per_device == 2 else {{}}
    cfg = config(out, objective=objective, per_device_train_batch_size=per_device, max_steps=3,
                 gradient_accumulation_steps=2, learning_rate=1e-2, dataloader_drop_last=True, **extra)
    train(cfg, model=tiny(), tokenizer=tok, train_dataset=data.train)
''')


def _run(cmd: list[str], cwd: Path, name: str) -> None:
    log = cwd / f"{name}.log"
    code = run_launch(cmd, cwd, launch_env(), 600, log, attempts=3, outputs=(cwd / name,))  # tests/launch.py
    assert code == 0, ("timed out after 600 s\n" if code is None else "") + log.read_text()[-8000:]


@pytest.mark.parametrize("objective", ["dft"])
def test_two_process_ddp_equals_single_process(tmp_path, objective):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(Path(__file__).parent)))
    torchrun = Path(sys.executable).parent / "torchrun"
    _run([str(torchrun), "--standalone", "--nproc_per_node", "2", str(script),
          str(tmp_path / "ddp"), "2", objective], tmp_path, "ddp")
    _run([sys.executable, str(script), str(tmp_path / "single"), "4", objective], tmp_path, "single")
    ddp = load_file(str(tmp_path / "ddp" / "final" / "model.safetensors"))
    single = load_file(str(tmp_path / "single" / "final" / "model.safetensors"))
    assert ddp.keys() == single.keys()
    init = dict(__import__("test_train_support").tiny().state_dict())
    moved = max(float((single[k] - init[k]).abs().max()) for k in single)
    assert moved > 1e-3  # training changed the weights
    diff = max(float((ddp[k] - single[k]).abs().max()) for k in ddp)
    assert diff < 1e-5, diff
