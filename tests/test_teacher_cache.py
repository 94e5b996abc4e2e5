"""The teacher cache: build, read back, manifest, resumption, bad input, the Collator and the CLI.
Tiny random Llamas on the GPT-2 vocabulary; every stored value is compared with a live teacher."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from safetensors import safe_open

from qtarget.cli import main as qtarget_main
from qtarget.data import Collator, prepare_data
from qtarget.data.collate import CacheRows
from qtarget.models import tiny_causal_lm
from qtarget.ops.sparse_teacher import topk_from_logits
from qtarget.teacher_cache import (
    CorruptShardError,
    Manifest,
    MissingRowError,
    TeacherCache,
    build_cache,
    cache_folder,
)
from qtarget.teacher_cache.storage import META_KEY
from qtarget.teacher_cache.schema import tensors_sha256
from qtarget.teacher_cache.training import open_for_training
from test_train_support import tiny, tokenizer, toy_rows

K = 8


@pytest.fixture(scope="module")
def data():
    return prepare_data(toy_rows(14), tokenizer(), max_length=64, eval_fraction=0.2, seed=3)


def tiny_teacher(seed=7):
    return tiny_causal_lm(tokenizer(), hidden_size=48, num_layers=1, num_heads=2, seed=seed)


@pytest.fixture(scope="module")
def teacher():
    return tiny_teacher()


def build(folder, teacher, data, **kw):
    args = dict(top_k=K, rows_per_shard=4, batch_size=3, eval_examples=data.eval, progress=False,
                logprob_dtype="float32")  # stored as computed: compared with the live teacher exactly
    args.update(kw)
    return build_cache(teacher, tokenizer(), data.train, folder, **args)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, teacher, data):
    folder = tmp_path_factory.mktemp("cache")
    build(folder, teacher, data)
    return folder


def live_topk(teacher, examples, k=K):
    """The teacher's top-k at every supervised token, one example at a time (no padding)."""
    out = []
    for ex in examples:
        ids = torch.tensor([ex["input_ids"]])
        with torch.no_grad():
            logits = teacher(input_ids=ids).logits[0]
        pos = [t for t in range(1, len(ex["labels"])) if ex["labels"][t] != -100]
        out.append((pos, topk_from_logits(logits[[t - 1 for t in pos]], k)))
    return out


def test_cache_holds_the_live_teachers_top_k(cache_dir, teacher, data):
    cache = TeacherCache(cache_dir)
    for split, examples in (("train", data.train), ("eval", data.eval)):
        for i, (pos, want) in enumerate(live_topk(teacher, examples)):
            row = cache.row(split, i)
            assert row.positions.tolist() == pos
            assert torch.equal(row.topk.ids, want.ids)
            assert torch.allclose(row.topk.logprobs, want.logprobs, atol=1e-5)
            assert torch.allclose(row.topk.log_tail, want.log_tail, atol=1e-4)


def test_manifest_records_what_was_cached(cache_dir, data):
    m = Manifest.load(cache_dir)
    tok = tokenizer()
    assert m.top_k == K and m.temperature == 1.0 and m.vocab_size == len(tok) and m.logprob_dtype == "float32"
    assert m.splits["train"].rows == len(data.train) and m.splits["eval"].rows == len(data.eval)
    n_sup = sum(sum(1 for t in ex["labels"][1:] if t != -100) for ex in data.train)
    assert m.splits["train"].supervised_tokens == n_sup
    assert set(m.teacher) == {"name", "revision", "weights"}
    shards = sorted(p.name for p in (cache_dir / "train").iterdir())
    assert shards == [f"shard-{i:06d}.safetensors" for i in range(math.ceil(len(data.train) / 4))]


def test_collator_puts_the_cache_in_batches_aligned_with_labels(cache_dir, data):
    cache = TeacherCache(cache_dir)
    rows = CacheRows(data.train, "train")
    batch = Collator(tokenizer().pad_token_id, teacher_cache=cache)([rows[5], rows[2], rows[9]])
    B, T = batch["labels"].shape
    assert batch["teacher_topk_ids"].shape == (B, T, K) and batch["teacher_topk_ids"].dtype == torch.int64
    assert batch["teacher_topk_logprobs"].shape == (B, T, K) and batch["teacher_topk_log_tail"].shape == (B, T)
    assert bool(torch.isfinite(batch["teacher_topk_logprobs"]).all())
    for b, i in enumerate([5, 2, 9]):
        row = cache.row("train", i)
        assert torch.equal(batch["teacher_topk_ids"][b, row.positions], row.topk.ids)
        assert torch.equal(batch["teacher_topk_log_tail"][b, row.positions], row.topk.log_tail)
        assert (batch["labels"][b, row.positions] != -100).all()
    with pytest.raises(ValueError, match="has no 'teacher_cache_row'"):
        Collator(tokenizer().pad_token_id, teacher_cache=cache)([data.train[0]])


KILLED_BUILD = textwrap.dedent("""
    import os, signal, sys, torch
    sys.path.insert(0, {tests!r})
    torch.set_num_threads({threads})
    from qtarget.data import prepare_data
    from qtarget.models import tiny_causal_lm
    from qtarget.teacher_cache import build_cache, storage
    from test_train_support import tokenizer, toy_rows

    real, calls = storage.save_file, []

    def save_file(tensors, path, metadata=None):  # SIGKILL halfway through writing the third shard
        calls.append(path)
        if len(calls) == 3:
            open(path, "wb").write(b"half a shard")
            os.kill(os.getpid(), signal.SIGKILL)
        return real(tensors, path, metadata=metadata)

    storage.save_file = save_file
    data = prepare_data(toy_rows(14), tokenizer(), max_length=64, eval_fraction=0.2, seed=3)
    teacher = tiny_causal_lm(tokenizer(), hidden_size=48, num_layers=1, num_heads=2, seed=7)
    build_cache(teacher, tokenizer(), data.train, {out!r}, top_k={k}, rows_per_shard=4, batch_size=3,
                eval_examples=data.eval, progress=False, logprob_dtype="float32")
""")


def test_resume_after_a_killed_build_gives_identical_shards(tmp_path, teacher, data, cache_dir):
    script = KILLED_BUILD.format(tests=str(Path(__file__).parent), threads=torch.get_num_threads(),
                                 out=str(tmp_path / "resumed"), k=K)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert len(list((tmp_path / "resumed").glob("*/shard-*"))) == 2
    assert list((tmp_path / "resumed").glob("*/.shard-*.tmp-*"))  # the half-written temporary file
    with pytest.raises(MissingRowError, match=r"incomplete: missing .*train rows \d+-\d+ \(shard-0000"):
        TeacherCache(tmp_path / "resumed")
    build(tmp_path / "resumed", teacher, data)  # the re-run continues where the killed one stopped
    assert not list((tmp_path / "resumed").glob("*/.shard-*"))
    whole = sorted(p.relative_to(cache_dir) for p in cache_dir.rglob("*") if p.is_file())
    resumed = sorted(p.relative_to(tmp_path / "resumed") for p in (tmp_path / "resumed").rglob("*") if p.is_file())
    assert whole == resumed
    for rel in whole:
        assert (cache_dir / rel).read_bytes() == (tmp_path / "resumed" / rel).read_bytes(), rel


def test_ranks_build_disjoint_shards_that_equal_one_process(tmp_path, teacher, data, cache_dir):
    for rank in (1, 0):
        build(tmp_path, teacher, data, rank=rank, world_size=2)
    for p in cache_dir.rglob("*.safetensors"):
        assert (tmp_path / p.relative_to(cache_dir)).read_bytes() == p.read_bytes()


def test_rebuild_with_other_settings_names_the_key(cache_dir, teacher, data):
    with pytest.raises(ValueError, match=r"top_k: it has 8, this run 4"):
        build(cache_dir, teacher, data, top_k=4)
    with pytest.raises(ValueError, match=r"teacher.weights"):
        build(cache_dir, tiny_teacher(seed=8), data)


def test_training_checks_tokenizer_vocabulary_and_rows(cache_dir, data):
    student = tiny(seed=1)
    open_for_training(str(cache_dir), tokenizer=tokenizer(), student=student, train_examples=data.train,
                      eval_examples=data.eval)
    from qtarget.models import load_tokenizer

    with pytest.raises(ValueError, match="another tokenizer"):
        open_for_training(str(cache_dir), tokenizer=load_tokenizer("smollm2"), student=student,
                          train_examples=data.train)
    with pytest.raises(ValueError, match="vocab_size"):
        open_for_training(str(cache_dir), tokenizer=tokenizer(), student=tiny_vocab(len(tokenizer()) + 64),
                          train_examples=data.train)
    other = prepare_data(toy_rows(14), tokenizer(), max_length=12, eval_fraction=0.2, seed=3)
    with pytest.raises(ValueError, match=r"row \d+ of the 'train' split differs.*max_length: cache has 64, this run 12"):
        cache = TeacherCache(cache_dir)
        cache.manifest.settings["max_length"] = 64  # as `qtarget teacher-cache` records it
        cache.check_rows("train", other.train, {"max_length": 12})
    with pytest.raises(ValueError, match=r"'train' split has \d+ rows, this run has 3"):
        open_for_training(str(cache_dir), tokenizer=tokenizer(), student=student, train_examples=data.train[:3])
    with pytest.raises(MissingRowError, match="no row 99"):
        TeacherCache(cache_dir).row("train", 99)
    with pytest.raises(MissingRowError, match="no 'test' split"):
        TeacherCache(cache_dir).row("test", 0)


def tiny_vocab(n):
    return tiny_causal_lm(n, hidden_size=16, num_layers=1, num_heads=2)


def copy_cache(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_corrupted_shard_is_named(cache_dir, tmp_path):
    folder = copy_cache(cache_dir, tmp_path / "c")
    shard = folder / "train" / "shard-000001.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-5] ^= 0xFF  # flip bits in the tensor data
    shard.write_bytes(bytes(raw))
    cache = TeacherCache(folder)  # headers are intact; the checksum is checked on first use
    cache.row("train", 0)
    with pytest.raises(CorruptShardError, match=r"shard-000001.*sha256.*delete"):
        cache.row("train", 5)
    with pytest.raises(CorruptShardError, match=r"shard-000001.*sha256"):
        TeacherCache(folder).verify_all()
    shard.write_bytes(b"not a safetensors file")
    with pytest.raises(CorruptShardError, match=r"shard-000001.safetensors cannot be read"):
        TeacherCache(folder)
    (folder / "manifest.json").write_text("{broken")
    with pytest.raises(ValueError, match="manifest is corrupted"):
        TeacherCache(folder)


def test_shard_with_another_k_is_refused(cache_dir, tmp_path):
    folder = copy_cache(cache_dir, tmp_path / "c")
    rewrite_shard(folder / "train" / "shard-000000.safetensors",
                  lambda t: t.update(ids=t["ids"][:, :4].contiguous(), logprobs=t["logprobs"][:, :4].contiguous()))
    with pytest.raises(CorruptShardError, match=r"shard-000000.safetensors has k = 4 ids per token, the manifest "
                                                r"says top_k = 8"):
        TeacherCache(folder)


def test_shard_from_another_manifest_is_refused(cache_dir, tmp_path):
    folder = copy_cache(cache_dir, tmp_path / "c")
    m = json.loads((folder / "manifest.json").read_text())
    m["temperature"] = 2.0
    (folder / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CorruptShardError, match="built for another manifest"):
        TeacherCache(folder)


def rewrite_shard(path: Path, edit) -> None:
    """Edit a shard's tensors and re-sign it (a producer bug, not bit rot)."""
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()[META_KEY])
    tensors = dict(load_file(str(path)))
    edit(tensors)
    meta["sha256"] = tensors_sha256(tensors)
    save_file(tensors, str(path), metadata={META_KEY: json.dumps(meta)})


def test_out_of_range_and_duplicate_ids_are_named_with_their_row(cache_dir, tmp_path):
    folder = copy_cache(cache_dir, tmp_path / "c")
    V = len(tokenizer())
    path = folder / "train" / "shard-000001.safetensors"  # rows 4..7

    def bad_id(t):
        ids = t["ids"].to(torch.int32)
        ids[t["row_offsets"][1], 3] = V + 10  # row 5, its first supervised token
        t["ids"] = ids.to(t["ids"].dtype)

    rewrite_shard(path, bad_id)
    cache = TeacherCache(folder)
    cache.row("train", 4)
    with pytest.raises(ValueError, match=rf"row 5 of the 'train' split.*`ids` holds {V + 10} at position \(0,\)"):
        cache.row("train", 5)

    def duplicate(t):
        t["ids"][t["row_offsets"][2], 1] = t["ids"][t["row_offsets"][2], 0]

    rewrite_shard(path, duplicate)
    with pytest.raises(ValueError, match=r"row 6 of the 'train' split.*repeats a token id"):
        TeacherCache(folder).row("train", 6)


def test_cli_builds_the_same_cache_as_the_api(tmp_path, teacher):
    from qtarget.data import write_jsonl
    from qtarget.teacher_cache.cli import main

    tok = tokenizer()
    rows = toy_rows(10)
    write_jsonl(rows, tmp_path / "data.jsonl")
    tok.save_pretrained(tmp_path / "student")
    tiny(seed=1).save_pretrained(tmp_path / "student")
    tok.save_pretrained(tmp_path / "teacher")
    teacher.save_pretrained(tmp_path / "teacher")
    argv = ["--teacher_model", str(tmp_path / "teacher"), "--model", str(tmp_path / "student"),
            "--dataset", str(tmp_path / "data.jsonl"), "--output_dir", str(tmp_path / "cli"), "--top_k", "5",
            "--max_length", "48", "--rows_per_shard", "3", "--progress", "false", "--dtype", "float32",
            "--logprob_dtype", "float32"]
    assert main(argv) == 0
    m = Manifest.load(tmp_path / "cli")
    assert m.top_k == 5 and m.settings["max_length"] == 48 and m.student == str(tmp_path / "student")
    prepared = prepare_data(str(tmp_path / "data.jsonl"), tok, max_length=48)
    cache = TeacherCache(tmp_path / "cli")
    cache.check_rows("train", prepared.train)
    for i, (pos, want) in enumerate(live_topk(teacher, prepared.train, k=5)):
        assert torch.equal(cache.row("train", i).topk.ids, want.ids)
    with pytest.raises(ValueError, match="top_k: it has 5, this run 6"):
        main([a if a != "5" else "6" for a in argv])
    # a training recipe gives the same keys (its teacher_cache is the folder; training-only keys are ignored)
    recipe = {"model": str(tmp_path / "student"), "teacher_model": str(tmp_path / "teacher"), "dtype": "float32",
              "dataset": str(tmp_path / "data.jsonl"), "max_length": 48, "teacher_cache": str(tmp_path / "cli"),
              "objective": "target_sft", "learning_rate": 1e-5}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "cli").rglob("*.safetensors")}
    assert main(["--config", str(tmp_path / "recipe.yaml"), "--top_k", "5", "--rows_per_shard", "3",
                 "--progress", "false", "--logprob_dtype", "float32"]) == 0  # same manifest: nothing left to build
    assert before == {p: p.stat().st_mtime_ns for p in (tmp_path / "cli").rglob("*.safetensors")}
    assert qtarget_main(["teacher-cache", "--model", "x"]) == 2  # missing keys: a usage error, not a traceback


def test_cache_folder_names_teacher_data_and_k(tmp_path, teacher, data):
    a = cache_folder(tmp_path, teacher, data.train, top_k=8)
    assert a == cache_folder(tmp_path, tiny_teacher(), list(data.train), top_k=8)  # same weights, same rows
    assert a.parent == tmp_path
    others = {cache_folder(tmp_path, teacher, data.train[:-1], top_k=8), cache_folder(tmp_path, teacher, data.train, top_k=4),
              cache_folder(tmp_path, tiny_teacher(seed=8), data.train, top_k=8),
              cache_folder(tmp_path, teacher, data.train, top_k=8, temperature=2.0)}
    assert a not in others and len(others) == 4
