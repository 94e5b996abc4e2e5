"""`qtarget profile`: the chunked measurement against a direct full-logits computation (float64), the
summary's quantiles and shares against numpy on those reference values, and the CLI end to end."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from qtarget import cli
from qtarget.data import prepare_data, write_jsonl
from qtarget.models import tiny_causal_lm
from qtarget.profile import profile_examples, summarize
from qtarget.profile.cli import sample_indices
from qtarget.profile.summary import QUANTILES
from qtarget.teacher_cache import TeacherCache, build_cache

ROWS = [{"prompt": f"Q{i}: {i} plus {3 * i % 7}?", "response": f" {i} + {3 * i % 7} = {i + 3 * i % 7}. " * (1 + i % 3)}
        for i in range(9)]


def planted(tokenizer, seed: int):
    """A tiny random model whose LM head is planted so that p_y spreads over (0, 1) (a random head gives
    every token ~1/V): row y of the head gets k_t * h_t / |h_t|^2 for each position t labelled y, with
    k_t drawn from [0, 14], so the logit of y at t is about k_t."""
    model = tiny_causal_lm(tokenizer, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for ex in prepare_data(ROWS, tokenizer, max_length=96).train:
            h = model.model(input_ids=torch.tensor([ex["input_ids"]])).last_hidden_state[0, :-1]
            for t, y in enumerate(ex["labels"][1:]):
                if y != -100:
                    k = 14.0 * torch.rand((), generator=gen)
                    model.lm_head.weight[y] += k * h[t] / h[t].square().sum()
    return model


def reference(model, examples, pad_id):
    """Per supervised token, float64: p_y, entropy, argmax and the full log-probs, from model(...).logits."""
    out = {"p_y": [], "entropy": [], "argmax": [], "logp": [], "row": [], "label": []}
    for i, ex in enumerate(examples):
        ids = torch.tensor([ex["input_ids"]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1].double()
        labels = torch.tensor(ex["labels"][1:])
        keep = labels != -100
        logp = torch.log_softmax(logits[keep], -1)
        y = labels[keep]
        out["p_y"].append(logp.gather(-1, y[:, None])[:, 0].exp())
        out["entropy"].append(-(logp.exp() * logp).sum(-1))
        out["argmax"].append(logp.argmax(-1))
        out["logp"].append(logp)
        out["row"].append(torch.full_like(y, i))
        out["label"].append(y)
    return {k: torch.cat(v).numpy() for k, v in out.items()}


@pytest.fixture
def examples(smollm2_tokenizer):
    return list(prepare_data(ROWS, smollm2_tokenizer, max_length=96).train)


def test_profile_matches_full_logits(smollm2_tokenizer, examples):
    model = planted(smollm2_tokenizer, 3)
    ref = reference(model, examples, smollm2_tokenizer.pad_token_id)
    # a tiny budget forces many 8-row chunks; batches of 4 mix lengths (padding)
    prof = profile_examples(model, examples, pad_token_id=smollm2_tokenizer.pad_token_id, batch_size=4,
                            memory_budget=1)
    assert prof.tokens == ref["p_y"].size == sum(sum(t != -100 for t in ex["labels"][1:]) for ex in examples)
    np.testing.assert_array_equal(prof.row, ref["row"])
    np.testing.assert_array_equal(prof.label, ref["label"])
    np.testing.assert_allclose(prof.p_y, ref["p_y"], rtol=2e-4, atol=1e-7)
    np.testing.assert_allclose(prof.entropy, ref["entropy"], rtol=2e-4, atol=1e-5)
    np.testing.assert_array_equal(prof.top1, ref["argmax"] == ref["label"])
    # the planted head gives a spread of p_y, so the quantiles below test something
    assert ref["p_y"].min() < 0.1 and np.quantile(ref["p_y"], 0.9) > 0.3

    s = summarize(prof, smollm2_tokenizer)
    p = ref["p_y"]
    assert s["tokens"] == p.size and s["rows"] == len(examples)
    for q in QUANTILES:
        assert s["p_y_quantiles"][f"{q:g}"] == pytest.approx(np.quantile(p, q), rel=2e-4, abs=1e-7)
    assert s["share_p_y_below_0.1"] == pytest.approx(np.mean(p < 0.1))
    assert s["share_p_y_above_0.9"] == pytest.approx(np.mean(p > 0.9))
    assert s["mean_p_y"] == pytest.approx(p.mean(), rel=2e-4)
    assert s["mean_entropy"] == pytest.approx(ref["entropy"].mean(), rel=2e-4)
    assert s["top1_agreement"] == pytest.approx(np.mean(ref["argmax"] == ref["label"]))
    assert sum(s["p_y_histogram"]["counts"]) == p.size
    assert sum(b["tokens"] for b in s["by_position"]) == p.size
    # the most off-prior row is the one with the highest mean NLL
    nll = {r: -np.log(p[ref["row"] == r]).mean() for r in np.unique(ref["row"])}
    assert s["rows_most_off_prior"][0]["row"] == max(nll, key=nll.get)
    assert s["rows_most_off_prior"][0]["mean_nll"] == pytest.approx(max(nll.values()), rel=1e-3)


def test_profile_teacher_against_full_logits(smollm2_tokenizer, examples):
    student = planted(smollm2_tokenizer, 3)
    teacher = planted(smollm2_tokenizer, 4)
    pad = smollm2_tokenizer.pad_token_id
    ref_s, ref_t = reference(student, examples, pad), reference(teacher, examples, pad)
    prof = profile_examples(student, examples, pad_token_id=pad, teacher=teacher, batch_size=5, memory_budget=2**22)
    t = prof.teacher
    np.testing.assert_allclose(t["p_y"], ref_t["p_y"], rtol=2e-4, atol=1e-7)
    np.testing.assert_array_equal(t["agree"], ref_t["argmax"] == ref_s["argmax"])
    kl = (np.exp(ref_t["logp"]) * (ref_t["logp"] - ref_s["logp"])).sum(-1)
    np.testing.assert_allclose(t["kl"], kl, rtol=1e-3, atol=1e-5)
    s = summarize(prof)
    assert s["teacher"]["share_teacher_above_student"] == pytest.approx(np.mean(ref_t["p_y"] > ref_s["p_y"]))
    # the student as its own teacher: full agreement, zero KL
    same = profile_examples(student, examples, pad_token_id=pad, teacher=copy.deepcopy(student), batch_size=9)
    assert same.teacher["agree"].all()
    np.testing.assert_allclose(same.teacher["kl"], 0.0, atol=1e-5)


def test_profile_rejects_empty_and_double_teacher(smollm2_tokenizer, tiny_model, examples):
    with pytest.raises(ValueError, match="no examples"):
        profile_examples(tiny_model, [], pad_token_id=0)
    with pytest.raises(ValueError, match="not both"):
        profile_examples(tiny_model, examples, pad_token_id=0, teacher=tiny_model, teacher_cache=object())


def test_profile_cli_end_to_end(tmp_path, smollm2_tokenizer, capsys):
    folder = tmp_path / "tiny"
    planted(smollm2_tokenizer, 3).save_pretrained(folder)
    smollm2_tokenizer.save_pretrained(folder)
    data = write_jsonl(ROWS, tmp_path / "d.jsonl")
    out = tmp_path / "out"
    rc = cli.main(["profile", "--model", str(folder), "--dataset", str(data), "--limit", "6", "--output_dir",
                   str(out), "--no_progress", "--teacher", str(folder)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "objectives worth trying first" in text and "qtarget lab --model" in text
    record = json.loads((out / "profile.json").read_text())
    for key in ("p_y_quantiles", "share_p_y_below_0.1", "share_p_y_above_0.9", "mean_entropy", "top1_agreement",
                "tokens"):
        assert key in record
    assert set(record["p_y_quantiles"]) == {"0.1", "0.25", "0.5", "0.75", "0.9"}
    assert record["rows"] == 6
    # off-prior rows are named by their row in the dataset: that row's NLL, computed directly
    worst = record["rows_most_off_prior"][0]
    assert worst["dataset_row"] == sample_indices(len(ROWS), 6, 0)[worst["row"]]
    model = planted(smollm2_tokenizer, 3)
    (example,) = prepare_data([ROWS[worst["dataset_row"]]], smollm2_tokenizer, max_length=1024).train
    ref = reference(model, [example], smollm2_tokenizer.pad_token_id)
    assert worst["mean_nll"] == pytest.approx(-np.log(ref["p_y"]).mean(), rel=1e-3)
    assert record["teacher"]["teacher_student_agreement"] == 1.0  # the same model as teacher
    assert record["lab_command"].startswith(f"qtarget lab --model {folder} --dataset {data}")
    assert record["advice"]["recommendations"] and record["advice"]["caveat"]
    assert (out / "p_y_histogram.png").stat().st_size > 1000


@pytest.mark.parametrize("argv, message", [
    (["--limit", "-1"], "--limit must be >= 0"),
    (["--batch_size", "0"], "--batch_size must be >= 1"),
    (["--dtype", "int8"], "dtype must be one of"),
    (["--teacher_cache", "/nonexistent/cache"], "--teacher_cache: no such folder"),
    (["--limit", "many"], "argument --limit: invalid int value"),
    (["--teacher", "a", "--teacher_cache", "b"], "not allowed with argument"),
])
def test_profile_cli_bad_input_one_line(tmp_path, capsys, argv, message):
    data = write_jsonl(ROWS, tmp_path / "d.jsonl")
    rc = cli.main(["profile", "--model", "smollm2", "--dataset", str(data), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1].startswith("qtarget profile: error: ") and message in err[-1]


def test_profile_from_a_teacher_cache_matches_the_live_teacher(tmp_path, smollm2_tokenizer, capsys):
    """--teacher_cache: the cached top-k gives the live teacher's top-1 and, for labels inside the top-k,
    its p_y; rows are looked up by their index in the cache's train split (checked by fingerprint)."""
    student, teacher = planted(smollm2_tokenizer, 3), planted(smollm2_tokenizer, 4)
    data = write_jsonl(ROWS, tmp_path / "d.jsonl")
    examples = list(prepare_data(str(data), smollm2_tokenizer, max_length=1024).train)
    cache = tmp_path / "cache"
    settings = {"max_length": 1024, "response_only": True, "chat_template": False, "eval_fraction": 0.0}
    build_cache(teacher, smollm2_tokenizer, examples, cache, top_k=16, settings=settings, progress=False,
                logprob_dtype="float32")  # p_y compared at 1e-4: stored as computed
    folder = tmp_path / "student"
    student.save_pretrained(folder)
    smollm2_tokenizer.save_pretrained(folder)
    out = tmp_path / "out"
    rc = cli.main(["profile", "--model", str(folder), "--dataset", str(data), "--teacher_cache", str(cache),
                   "--limit", "5", "--seed", "1", "--output_dir", str(out), "--no_progress"])
    assert rc == 0, capsys.readouterr().err
    record = json.loads((out / "profile.json").read_text())
    # the same sampled rows with the live teacher
    rows = sample_indices(len(examples), 5, 1)
    live = profile_examples(student, [examples[i] for i in rows], pad_token_id=smollm2_tokenizer.pad_token_id,
                            teacher=teacher)
    ref = reference(teacher, [examples[i] for i in rows], smollm2_tokenizer.pad_token_id)
    s = summarize(live)
    assert record["tokens"] == live.tokens
    assert record["teacher"]["top1_agreement"] == pytest.approx(s["teacher"]["top1_agreement"])
    assert record["teacher"]["teacher_student_agreement"] == pytest.approx(s["teacher"]["teacher_student_agreement"])
    rank = (ref["logp"] > ref["logp"][np.arange(live.tokens), ref["label"]][:, None]).sum(-1)
    assert (rank < 16).mean() > 0.5  # most labels are inside the cached top-k, so the check below bites
    cached = profile_examples(student, [examples[i] for i in rows], pad_token_id=smollm2_tokenizer.pad_token_id,
                              teacher_cache=TeacherCache(cache), cache_rows=rows)
    inside = rank < 16
    np.testing.assert_allclose(cached.teacher["p_y"][inside], ref["p_y"][inside], rtol=1e-4, atol=1e-7)
    # a cache of other data is refused, naming the row
    other = write_jsonl(ROWS[::-1], tmp_path / "other.jsonl")
    rc = cli.main(["profile", "--model", str(folder), "--dataset", str(other), "--teacher_cache", str(cache),
                   "--no_progress"])
    assert rc == 2 and "was built for other data" in capsys.readouterr().err
