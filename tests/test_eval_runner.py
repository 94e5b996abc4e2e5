"""evaluate(): grading, files, resume after an interruption, and the `qtarget eval` CLI."""
from __future__ import annotations

import json

import pytest
import torch

from qtarget.evaluation.benchmarks import Problem, load_benchmark
from qtarget.evaluation.generation import HFGenerator, Sample
from qtarget.evaluation.prompts import prompt_ids, resolve_style
from qtarget.evaluation.runner import evaluate, read_records
from qtarget.models import tiny_causal_lm


class ScriptedGenerator:
    """Answers from a table keyed by the prompt's token ids; records every call."""

    def __init__(self, tok, problems, answers):
        self.by_prompt = {}
        from qtarget.evaluation.prompts import prompt_ids

        for p in problems:
            self.by_prompt[tuple(prompt_ids(tok, p))] = answers[p.id]
        self.calls = []

    def generate(self, prompts, *, max_new_tokens, temperature=0.0, top_p=1.0, seed=0):
        self.calls.append(len(prompts))
        return [Sample(text=self.by_prompt[tuple(p)], token_ids=[1, 2, 3], num_tokens=3, cut=False, entropy=0.5)
                for p in prompts]


class SpyGenerator(HFGenerator):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.generated = 0

    def generate(self, prompts, **kw):
        self.generated += len(prompts)
        return super().generate(prompts, **kw)


# decode single-threaded (see the `one_torch_thread` fixture in conftest.py)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tok(smollm2_tokenizer):
    return smollm2_tokenizer


@pytest.fixture(scope="module")
def model(tok):
    m = tiny_causal_lm(tok, hidden_size=32, seed=2)
    with torch.no_grad():
        m.lm_head.weight.mul_(40.0)
    return m


def test_grading_and_summary_with_scripted_answers(tok, tmp_path):
    problems = [
        Problem("t/1", "What is half of one?", r"\frac{1}{2}", "t"),
        Problem("t/2", "How many?", "1,000", "t"),
        Problem("m/1", "Pick one.\n(A) x\n(B) y\n(C) z", "B", "mc"),
    ]
    answers = {"t/1": r"so \boxed{0.5}", "t/2": "#### 999", "m/1": r"The answer is \boxed{B}"}
    gen = ScriptedGenerator(tok, problems, answers)
    res = evaluate(None, tok, problems, samples=2, generator=gen, output_dir=tmp_path, progress=False,
                   batch_size=4)
    assert sum(gen.calls) == 6
    correct = {(r["problem_id"], r["sample_idx"]): r["correct"] for r in res.records}
    assert correct == {("t/1", 0): True, ("t/1", 1): True, ("t/2", 0): False, ("t/2", 1): False,
                       ("m/1", 0): True, ("m/1", 1): True}
    assert res.summary["benchmarks"]["t"]["accuracy"] == pytest.approx(0.5)
    assert res.summary["benchmarks"]["mc"]["pass@2"] == pytest.approx(1.0)
    assert res.summary["overall"]["accuracy"] == pytest.approx(2 / 3)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["overall"] == res.summary["overall"]
    assert "| t |" in (tmp_path / "summary.md").read_text()
    assert len(read_records(tmp_path / "samples.jsonl")) == 6
    # a second run finds everything done and generates nothing
    gen2 = ScriptedGenerator(tok, problems, answers)
    again = evaluate(None, tok, problems, samples=2, generator=gen2, output_dir=tmp_path, progress=False,
                     batch_size=4)
    assert gen2.calls == [] and again.summary["generated"] == 0
    assert again.summary["overall"] == res.summary["overall"]
    # regrade: a verdict stored by an older checker is recomputed from the stored response
    recs = read_records(tmp_path / "samples.jsonl")
    recs[0]["correct"] = not recs[0]["correct"]
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    stale = evaluate(None, tok, problems, samples=2, generator=gen2, output_dir=tmp_path, progress=False,
                     batch_size=4)
    assert stale.summary["overall"] != res.summary["overall"]
    fixed = evaluate(None, tok, problems, samples=2, generator=gen2, output_dir=tmp_path, progress=False,
                     batch_size=4, regrade=True)
    assert gen2.calls == [] and fixed.summary["overall"] == res.summary["overall"]
    on_disk = {(r["problem_id"], r["sample_idx"]): r["correct"] for r in read_records(tmp_path / "samples.jsonl")}
    assert on_disk == correct


def _run(model, tok, problems, out, **kw):
    gen = SpyGenerator(model, tok, batch_size=kw.get("batch_size", 3))
    res = evaluate(model, tok, problems, generator=gen, output_dir=out, progress=False, max_new_tokens=5,
                   **kw)
    return res, gen.generated


def _records_key(res):
    return [(r["problem_id"], r["sample_idx"], r["response"], r["num_tokens"], r["correct"]) for r in res.records]


def test_resume_after_kill_between_batches_equals_full_run(model, tok, tmp_path):
    problems = load_benchmark("arith:4")
    kw = dict(samples=2, temperature=1.0, batch_size=3, seed=5)
    full, n_full = _run(model, tok, problems, tmp_path / "full", **kw)
    assert n_full == 8
    part = tmp_path / "part"
    _run(model, tok, problems, part, **kw)
    lines = (part / "samples.jsonl").read_text().splitlines(keepends=True)
    # killed after the first batch (3 samples) while writing the second: a torn line at the end
    (part / "samples.jsonl").write_text("".join(lines[:3]) + lines[3][:25])
    resumed, n_resumed = _run(model, tok, problems, part, **kw)
    assert n_resumed == 5
    assert _records_key(resumed) == _records_key(full)  # same batches, same seeds -> same samples
    assert resumed.summary["overall"] == full.summary["overall"]
    assert len(read_records(part / "samples.jsonl")) == 8


def test_resume_inside_a_batch_generates_only_missing_greedy(model, tok, tmp_path):
    problems = load_benchmark("arith:5")
    kw = dict(samples=1, temperature=0.0, batch_size=3)
    full, _ = _run(model, tok, problems, tmp_path / "full", **kw)
    part = tmp_path / "part"
    _run(model, tok, problems, part, **kw)
    lines = (part / "samples.jsonl").read_text().splitlines(keepends=True)
    (part / "samples.jsonl").write_text("".join(lines[:2]))
    resumed, n = _run(model, tok, problems, part, **kw)
    assert n == 3
    assert _records_key(resumed) == _records_key(full)
    a, b = resumed.summary["benchmarks"]["arith"], full.summary["benchmarks"]["arith"]
    # entropies of a differently padded batch agree to float32 rounding, everything else exactly
    assert a["mean_token_entropy"] == pytest.approx(b["mean_token_entropy"], rel=1e-5)
    assert {k: v for k, v in a.items() if k != "mean_token_entropy"} == {
        k: v for k, v in b.items() if k != "mean_token_entropy"}


def test_resume_refuses_other_settings(model, tok, tmp_path):
    problems = load_benchmark("arith:2")
    _run(model, tok, problems, tmp_path, samples=1, temperature=0.0, batch_size=2)
    with pytest.raises(ValueError, match="different settings.*max_new_tokens|different settings.*temperature"):
        _run(model, tok, problems, tmp_path, samples=1, temperature=1.0, batch_size=2)


def test_bad_arguments(tok):
    p = [Problem("a", "q", "1", "s")]
    with pytest.raises(ValueError, match="problems is empty"):
        evaluate(None, tok, [], generator=object())
    with pytest.raises(ValueError, match="samples must be a positive integer"):
        evaluate(None, tok, p, samples=0, generator=object())
    with pytest.raises(ValueError, match="unique"):
        evaluate(None, tok, p + p, generator=object())
    with pytest.raises(ValueError, match="prompt_style must be one of"):
        evaluate(None, tok, p, prompt_style="fancy", generator=object())


def test_replies_fit_the_model_positions(tok, tmp_path):
    """prompt + max_new_tokens beyond the model's positions: max_new_tokens is lowered with a warning naming
    the longest prompt, and every reply then fits; a prompt that fills the positions is refused before anything
    is written."""
    short = tiny_causal_lm(tok, hidden_size=32, seed=2, max_position_embeddings=128)
    problems = [Problem("p1", "What is 2 + 2?", "4", "s"), Problem("p2", "What is " + "2 + " * 6 + "2?", "14", "s")]
    longest = max(len(prompt_ids(tok, p, style=resolve_style(tok, "auto"))) for p in problems)
    assert 64 < longest < 100
    with pytest.warns(UserWarning, match=rf"--max_new_tokens 512 → {128 - longest}: the longest prompt \(problem 'p2'"):
        result = evaluate(short, tok, problems, samples=1, temperature=0.0, max_new_tokens=512, batch_size=2,
                          output_dir=tmp_path / "fit", progress=False)
    assert json.loads((tmp_path / "fit" / "config.json").read_text())["max_new_tokens"] == 128 - longest
    assert all(r["num_tokens"] <= 128 - longest for r in read_records(tmp_path / "fit" / "samples.jsonl"))
    assert result.summary["generated"] == 2
    too_long = [Problem("big", "What is " + "2 + " * 40 + "2?", "82", "s")]
    with pytest.raises(ValueError, match=r"problem 'big': its prompt has \d+ tokens, the model's position limit is 128"):
        evaluate(short, tok, too_long, samples=1, max_new_tokens=8, output_dir=tmp_path / "big", progress=False)
    assert not (tmp_path / "big").exists()


def test_cli_runs_and_resumes(model, tok, tmp_path, capsys):
    from qtarget.cli import main as cli_main
    from qtarget.evaluation.cli import main

    model_dir = tmp_path / "tiny"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    out = tmp_path / "out"
    argv = ["--model", str(model_dir), "--benchmarks", "arith:3", "--samples", "2", "--temperature", "1.0",
            "--max_new_tokens", "4", "--batch_size", "4", "--output_dir", str(out), "--no_progress"]
    assert main(argv) == 0
    first = json.loads((out / "summary.json").read_text())
    assert first["generated"] == 6 and first["overall"]["samples"] == 6
    assert first["overall"]["mean_response_tokens"] <= 4
    assert main(argv) == 0
    second = json.loads((out / "summary.json").read_text())
    assert second["generated"] == 0 and second["overall"] == first["overall"]
    assert "| arith |" in capsys.readouterr().out
    assert cli_main(["eval", "--model", str(model_dir), "--benchmarks", "nope"]) == 2
    assert "qtarget eval: error: unknown benchmark 'nope'" in capsys.readouterr().err
