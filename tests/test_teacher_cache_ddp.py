"""Two processes (`torchrun --nproc_per_node 2`) build the same teacher cache, byte for byte, as one."""
from __future__ import annotations

import sys
from pathlib import Path

from launch import launch_env, run_launch
from qtarget.data import write_jsonl
from qtarget.models import tiny_causal_lm
from qtarget.teacher_cache.cli import main
from test_train_support import tokenizer, toy_rows


def test_two_processes_build_the_same_cache_as_one(tmp_path, one_torch_thread):
    tok = tokenizer()
    write_jsonl(toy_rows(12), tmp_path / "data.jsonl")
    for name, seed in (("student", 1), ("teacher", 7)):
        tok.save_pretrained(tmp_path / name)
        tiny_causal_lm(tok, hidden_size=32, num_layers=1, num_heads=2, seed=seed).save_pretrained(tmp_path / name)
    args = ["--teacher_model", str(tmp_path / "teacher"), "--model", str(tmp_path / "student"),
            "--dataset", str(tmp_path / "data.jsonl"), "--top_k", "6", "--max_length", "48", "--eval_fraction", "0.25",
            "--rows_per_shard", "2", "--batch_size", "2", "--dtype", "float32", "--progress", "false"]
    torchrun = Path(sys.executable).parent / "torchrun"
    log = tmp_path / "torchrun.log"  # a stalled launch is killed whole (tests/launch.py)
    code = run_launch([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "qtarget.teacher_cache.cli",
                       *args, "--output_dir", str(tmp_path / "two")], tmp_path, launch_env(), 300, log, attempts=3,
                      outputs=(tmp_path / "two",))
    assert code == 0, ("timed out after 300 s\n" if code is None else "") + log.read_text()[-8000:]
    # this process single-threaded too (one_torch_thread): the same matmul kernels as the workers
    assert main(args + ["--output_dir", str(tmp_path / "one")]) == 0
    one = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*") if p.is_file())
    two = sorted(p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*") if p.is_file())
    assert one == two and len([p for p in one if p.suffix == ".safetensors"]) == 5 + 2  # 9 train rows, 3 eval, 2 per shard
    for rel in one:
        assert (tmp_path / "one" / rel).read_bytes() == (tmp_path / "two" / rel).read_bytes(), rel
