"""The teacher served by vLLM / SGLang: caches built through a real HTTP server on 127.0.0.1 (the
fake in fake_teacher_server.py, backed by a tiny HF model) equal `--engine hf`'s built from the same
model; faults injected against that server give the stated refusal or a cache equal to an
uninterrupted build."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fake_teacher_server import Faults, FakeTeacherServer
from qtarget.cli import main as qtarget_main
from qtarget.data import prepare_data
from qtarget.models import load_tokenizer, tiny_causal_lm
from qtarget.teacher_cache import Manifest, MissingRowError, TeacherCache, build_cache
from qtarget.teacher_cache.engines import EndpointsDown, SGLangServer, VLLMServer
from test_train_support import tokenizer, toy_rows

K = 8
FAST = dict(max_retries=3, backoff=0.01, timeout=30.0)


@pytest.fixture(scope="module")
def data():
    return prepare_data(toy_rows(14), tokenizer(), max_length=64, eval_fraction=0.2, seed=3)


@pytest.fixture(scope="module")
def teacher():
    return tiny_causal_lm(tokenizer(), hidden_size=48, num_layers=1, num_heads=2, seed=7).eval()


def build(folder, engine, data, **kw):
    args = dict(top_k=K, rows_per_shard=4, batch_size=3, eval_examples=data.eval, progress=False,
                logprob_dtype="float32")  # compared at 1e-5: stored as computed
    args.update(kw)
    return build_cache(engine, tokenizer(), data.train, folder, **args)


@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory, teacher, data):
    folder = tmp_path_factory.mktemp("hf")
    build(folder, teacher, data)
    return folder


@pytest.fixture(scope="module")
def served_cache(tmp_path_factory, teacher, data):
    """An uninterrupted build through one healthy vLLM-shaped server (the reference for the fault tests)."""
    folder = tmp_path_factory.mktemp("served")
    with FakeTeacherServer(teacher, tokenizer()) as server:
        build(folder, VLLMServer([server.url], **FAST), data)
    return folder


def assert_same_cache(a: Path, b: Path, data, atol=1e-5):
    """Same rows and positions; same top-k ids apart from exact ties; log-probs and tails within atol."""
    ca, cb = TeacherCache(a), TeacherCache(b)
    for split, rows in (("train", data.train), ("eval", data.eval or [])):
        for i in range(len(rows)):
            ra, rb = ca.row(split, i), cb.row(split, i)
            assert torch.equal(ra.positions, rb.positions)
            assert torch.allclose(ra.topk.logprobs, rb.topk.logprobs, atol=atol, rtol=0), (split, i)
            assert torch.allclose(ra.topk.log_tail, rb.topk.log_tail, atol=atol, rtol=0), (split, i)
            same = ra.topk.ids == rb.topk.ids
            # where the ids differ, the two log-probs there tie (to atol): an exact tie ordered differently
            tied = (ra.topk.logprobs - rb.topk.logprobs).abs() <= atol
            assert bool((same | tied).all()), (split, i)
            assert same.float().mean() > 0.99


def same_bytes(a: Path, b: Path) -> None:
    files = sorted(p.relative_to(a) for p in a.rglob("*.safetensors"))
    assert files == sorted(p.relative_to(b) for p in b.rglob("*.safetensors")) and files
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_vllm_server_cache_equals_hf(tmp_path, teacher, data, hf_cache):
    with FakeTeacherServer(teacher, tokenizer()) as one, FakeTeacherServer(teacher, tokenizer()) as two:
        manifest = build(tmp_path, VLLMServer([one.url, two.url + "/v1/"], **FAST), data)
        assert one.answered > 2 and two.answered > 2  # requests spread over both endpoints
        assert one.widest == K + 1 or two.widest == K + 1  # labels outside the top-k came as k + 1 entries
    assert_same_cache(hf_cache, tmp_path, data)
    m = Manifest.load(tmp_path)
    assert m.engine["name"] == "vllm-server" and m.engine["version"] == "vllm 0.0.fake"
    assert m.engine["settings"]["temperature"] == 1.0 and m.engine["settings"]["repetition_penalty"] == 1.0
    assert m.teacher == {"name": "tiny-teacher", "revision": None, "weights": None} and m == manifest
    assert Manifest.load(hf_cache).engine["name"] == "hf"


def test_sglang_server_cache_equals_hf(tmp_path, teacher, data, hf_cache):
    with FakeTeacherServer(teacher, tokenizer(), flavor="sglang") as server:
        build(tmp_path, SGLangServer([server.url], teacher_name="my-teacher", **FAST), data)
    assert_same_cache(hf_cache, tmp_path, data)
    m = Manifest.load(tmp_path)
    assert m.engine["name"] == "sglang-server" and m.teacher["name"] == "my-teacher"


def test_older_vllm_without_prompt_token_ids(tmp_path, teacher, data, served_cache):
    with FakeTeacherServer(teacher, tokenizer(), faults=Faults(no_prompt_token_ids=True)) as server:
        build(tmp_path, VLLMServer([server.url], **FAST), data)
    same_bytes(served_cache, tmp_path)


@pytest.mark.parametrize("flavor", ["vllm", "sglang"])
def test_a_server_that_does_not_tokenise_text_is_checked_by_the_probe(tmp_path, teacher, data, hf_cache, flavor,
                                                                      capsys):
    engine_type = VLLMServer if flavor == "vllm" else SGLangServer
    with FakeTeacherServer(teacher, tokenizer(), flavor=flavor, faults=Faults(no_tokenize=True)) as server:
        build(tmp_path, engine_type([server.url], **FAST), data)
    assert "does not tokenise text: its tokenizer is not compared" in capsys.readouterr().err
    assert_same_cache(hf_cache, tmp_path, data)


@pytest.mark.parametrize("flavor", ["vllm", "sglang"])
def test_500s_and_a_slow_endpoint_are_retried(tmp_path, teacher, data, served_cache, flavor, capsys):
    engine_type = VLLMServer if flavor == "vllm" else SGLangServer
    faults = Faults(fail_first=3, slow_first=5, delay=6.0)
    with FakeTeacherServer(teacher, tokenizer(), flavor=flavor, faults=faults) as server:
        build(tmp_path, engine_type([server.url], concurrency=2, max_retries=8, backoff=0.01, timeout=3.0), data)
        assert server.scoring > server.answered  # failed and timed-out requests were asked again
    if flavor == "vllm":
        same_bytes(served_cache, tmp_path)
    else:
        assert_same_cache(served_cache, tmp_path, data)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_dead_endpoint_is_dropped_while_another_lives(tmp_path, teacher, data, served_cache, capsys):
    dead = f"http://127.0.0.1:{free_port()}"
    with FakeTeacherServer(teacher, tokenizer()) as server:
        build(tmp_path, VLLMServer([dead, server.url], **FAST), data)
    assert f"endpoint {dead} dropped" in capsys.readouterr().err
    same_bytes(served_cache, tmp_path)
    # one that answers its model info and then no scoring request (dies during the preflight)
    with FakeTeacherServer(teacher, tokenizer(), faults=Faults(die_after=0)) as mute, \
            FakeTeacherServer(teacher, tokenizer()) as server:
        build(tmp_path / "again", VLLMServer([mute.url, server.url], **FAST), data)
        assert mute.answered == 0 and mute.scoring >= FAST["max_retries"]
    assert f"endpoint {mute.url} dropped" in capsys.readouterr().err
    same_bytes(served_cache, tmp_path / "again")


def test_all_endpoints_failing_stops_with_one_line_and_resumes(tmp_path, teacher, data, served_cache):
    with FakeTeacherServer(teacher, tokenizer(), faults=Faults(die_after=6)) as server:
        with pytest.raises(EndpointsDown, match=r"every endpoint failed .*shards are complete in .*--resume") as e:
            build(tmp_path, VLLMServer([server.url], concurrency=1, **FAST), data)
    assert "\n" not in str(e.value)
    written = list(tmp_path.glob("*/shard-*.safetensors"))
    assert 0 < len(written) < len(list(served_cache.glob("*/shard-*.safetensors")))
    with pytest.raises(MissingRowError, match="incomplete"):
        TeacherCache(tmp_path)
    before = {p: p.stat().st_mtime_ns for p in written}
    with FakeTeacherServer(teacher, tokenizer()) as server:
        build(tmp_path, VLLMServer([server.url], **FAST), data, resume=True)
    assert before == {p: p.stat().st_mtime_ns for p in written}  # kept, not rebuilt
    same_bytes(served_cache, tmp_path)


@pytest.mark.parametrize("faults, flavor, message", [
    (Faults(cap_k=4), "vllm", r"refused prompt_logprobs=8 .*max allowed: 4.*--max-logprobs 8"),
    (Faults(cap_k=4), "sglang", r"returned 4 log-probs, fewer than top_k = 8.*--max-logprobs 8"),
    (Faults(add_bos=50256), "vllm", r"adds token 50256 at the start of the prompt"),
    (Faults(add_bos=50256, no_prompt_token_ids=True), "vllm", r"adds token .* at the start of the prompt"),
    (Faults(add_bos=50256), "sglang", r"adds token 50256 at the start of the prompt"),
    (Faults(drop_first=True), "sglang", r"drops the first prompt token"),
    (Faults(bad_id=50300), "vllm", r"token id 50300, outside the student's vocabulary \[0, 50257\)"),
])
def test_a_wrong_teacher_is_refused_before_anything_is_written(tmp_path, teacher, data, faults, flavor, message):
    engine_type = VLLMServer if flavor == "vllm" else SGLangServer
    with FakeTeacherServer(teacher, tokenizer(), flavor=flavor, faults=faults) as server:
        with pytest.raises(ValueError, match=message) as e:
            build(tmp_path / "c", engine_type([server.url], **FAST), data)
        assert server.scoring <= 2  # the probes (SGLang: text tokenised by /generate too), not the build
    assert "\n" not in str(e.value)
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("flavor", ["vllm", "sglang"])
def test_another_tokenizer_is_refused(tmp_path, teacher, data, flavor):
    engine_type = VLLMServer if flavor == "vllm" else SGLangServer
    with FakeTeacherServer(teacher, load_tokenizer("smollm2"), flavor=flavor) as server:
        with pytest.raises(ValueError, match=r"tokenizer is not the student's .*first difference at token"):
            build(tmp_path / "c", engine_type([server.url], **FAST), data)
    assert not (tmp_path / "c").exists()


def test_rows_longer_than_the_server_takes_are_refused(tmp_path, teacher, data):
    with FakeTeacherServer(teacher, tokenizer(), max_len=12) as server:
        with pytest.raises(ValueError, match=r"row \d+ has \d+ tokens; the server takes at most 12"):
            build(tmp_path / "c", VLLMServer([server.url], **FAST), data)


def write_inputs(tmp_path: Path) -> list[str]:
    """A student folder (tokenizer + config) and a JSONL dataset; the common CLI arguments."""
    from qtarget.data import write_jsonl

    write_jsonl(toy_rows(10), tmp_path / "data.jsonl")
    tokenizer().save_pretrained(tmp_path / "student")
    tiny_causal_lm(tokenizer(), hidden_size=16, num_layers=1, num_heads=2).save_pretrained(tmp_path / "student")
    return ["--model", str(tmp_path / "student"), "--dataset", str(tmp_path / "data.jsonl"), "--top_k", "5",
            "--max_length", "48", "--rows_per_shard", "2", "--progress", "false", "--retry_backoff", "0.01"]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_cli_kill_mid_build_then_resume_equals_an_uninterrupted_build(tmp_path, teacher, sig):
    common = write_inputs(tmp_path)
    with FakeTeacherServer(teacher, tokenizer(), faults=Faults(every_delay=0.1)) as server:
        server_args = ["--engine", "vllm-server", "--endpoint", server.url, "--concurrency", "1"]
        assert qtarget_main(["teacher-cache", *common, *server_args, "--output_dir", str(tmp_path / "whole")]) == 0
        killed = tmp_path / "killed"
        argv = ["teacher-cache", *common, *server_args, "--output_dir", str(killed)]
        proc = subprocess.Popen([sys.executable, "-c", f"import sys; from qtarget.cli import main; "
                                                        f"sys.exit(main({argv!r}))"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ})
        deadline = time.time() + 120
        while not list(killed.glob("train/shard-*.safetensors")) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(sig)  # a kill, or Ctrl-C
        proc.wait(timeout=60)
        err = proc.stderr.read().decode()
        if sig == signal.SIGKILL:
            assert proc.returncode == -signal.SIGKILL, err[-2000:]
        else:  # one line saying how to continue, no traceback
            assert proc.returncode == 130 and "interrupted" in err and "--resume" in err, err[-2000:]
            assert "Traceback" not in err
        n_whole = len(list((tmp_path / "whole").glob("*/shard-*.safetensors")))
        assert 0 < len(list(killed.glob("*/shard-*.safetensors"))) < n_whole
        assert qtarget_main([*argv, "--resume"]) == 0
    same_bytes(tmp_path / "whole", killed)
    assert (tmp_path / "whole" / "manifest.json").read_bytes() == (killed / "manifest.json").read_bytes()


@pytest.mark.parametrize("extra, message", [
    (["--engine", "vllm-server"], "--engine vllm-server needs at least one --endpoint URL"),
    (["--engine", "tgi", "--teacher_model", "t"], "--engine must be one of hf, vllm, vllm-server, sglang-server"),
    (["--teacher_model", "t", "--endpoint", "http://x:1"], "--endpoint is for --engine vllm-server / sglang-server"),
    (["--engine", "sglang-server", "--endpoint", "localhost:30000"], "--endpoint must be an http:// or https:// URL"),
    (["--engine", "vllm-server", "--endpoint", "http://x:1", "--temperature", "2"], "--temperature: --engine"),
    (["--engine", "vllm-server", "--endpoint", "http://x:1", "--concurrency", "0"], "--concurrency must be >= 1"),
])
def test_cli_errors_are_one_line_with_exit_2(tmp_path, capsys, extra, message):
    argv = ["teacher-cache", "--model", "m", "--dataset", "d.jsonl", "--output_dir", str(tmp_path / "c"), *extra]
    assert qtarget_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "c").exists()


def test_cli_resume_without_a_cache_and_a_dead_endpoint_are_one_line(tmp_path, capsys):
    common = write_inputs(tmp_path)
    dead = f"http://127.0.0.1:{free_port()}"
    argv = ["teacher-cache", *common, "--engine", "vllm-server", "--endpoint", dead, "--output_dir", str(tmp_path / "c")]
    assert qtarget_main([*argv, "--resume"]) == 2
    assert "--resume: " in capsys.readouterr().err and not (tmp_path / "c").exists()
    assert qtarget_main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and "every endpoint failed" in err[0] and dead in err[0], err
    assert not (tmp_path / "c").exists()


def test_select_many_equals_the_per_position_rule_and_the_tail_formula():
    """Many positions at once (numpy) = `select_topk` one by one (Python sort by log-prob, rank, id), with
    ties, missing ranks (SGLang), k + 1 entries (vLLM) and string-parsed ids; the tail = log(1 - sum p)."""
    import math
    import random

    from qtarget.teacher_cache.engines.base import log_tail_of, select_many, select_topk

    rng, k, V = random.Random(1), 4, 50
    entries = []
    for j in range(200):
        n = k + rng.randrange(0, 3)
        ids = rng.sample(range(V), n)
        lps = [round(-rng.random() * 3, 1) for _ in ids]  # rounded: many exact ties
        ranks = [None] * n if j % 3 == 0 else [rng.randrange(1, 9) for _ in ids]
        entries.append(list(zip(ids, lps, ranks)))
    ids, lps = select_many(entries, k, V, str)
    for j, e in enumerate(entries):
        want_ids, want_lps = select_topk(e, k, V, "x", "e")
        assert ids[j].tolist() == want_ids and lps[j].tolist() == want_lps
    tail = log_tail_of(torch.from_numpy(lps), k, V)
    for j in range(len(entries)):
        mass = sum(math.exp(v) for v in lps[j].tolist())
        want = math.log(1 - mass) if mass < 1 else -math.inf
        assert (tail[j].item() == want == -math.inf) or abs(tail[j].item() - want) < 1e-6
    with pytest.raises(ValueError, match=r"position 7.*token id 99, outside"):
        bad = [list(e) for e in entries]
        bad[7][0] = (99, -1.0, 1)
        select_many(bad, k, V, lambda j: f"position {j}")
    with pytest.raises(ValueError, match=r"position 3.*a token id twice"):
        bad = [list(e) for e in entries]
        bad[3][1] = (bad[3][0][0], -2.0, 2)
        select_many(bad, k, V, lambda j: f"position {j}")
    with pytest.raises(ValueError, match=r"position 5.*returned 2 log-probs, fewer than top_k = 4"):
        select_many(entries[:5] + [entries[5][:2]], k, V, lambda j: f"position {j}")


def test_training_from_a_served_cache_equals_training_from_the_hf_cache(tmp_path, teacher):
    """`train --teacher_cache` reads a server-built cache unchanged: two SGD steps of target_sft (tail
    `student`) from it give the parameters of the same steps from the --engine hf cache."""
    from qtarget.training import train
    from test_train_support import config, max_param_diff, params, tiny

    tok, rows = tokenizer(), toy_rows(10)
    data = prepare_data(rows, tok, max_length=48, eval_fraction=0.2, seed=0)  # as train() will prepare them
    args = dict(top_k=K, rows_per_shard=8, progress=False, eval_examples=data.eval, settings={"max_length": 48},
                logprob_dtype="float32")
    build_cache(teacher, tok, data.train, tmp_path / "hf", **args)
    with FakeTeacherServer(teacher, tok, flavor="sglang") as server:
        build_cache(SGLangServer([server.url], **FAST), tok, data.train, tmp_path / "served", **args)
    common = dict(objective="target_sft", objective_args={"eta": 0.5}, max_steps=2, max_length=48, optim="sgd",
                  learning_rate=100.0, eval_fraction=0.2, teacher_tail="student")
    runs = [train(config(tmp_path / f"run-{name}", teacher_cache=str(tmp_path / name), **common), model=tiny(),
                  tokenizer=tok, train_dataset=rows, save_final=False) for name in ("hf", "served")]
    moved = max_param_diff(params(runs[0].trainer.model), params(tiny()))
    apart = max_param_diff(params(runs[0].trainer.model), params(runs[1].trainer.model))
    assert moved > 1e-3  # training moved the weights
    assert apart <= 1e-3 * moved
    for a, b in zip(runs[0].history, runs[1].history):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
