"""`qtarget lab --tiny`: the whole lab pipeline on a random 2-layer model, through the real trainer.

Checks that every objective trained (exactly the trainable parameters changed, finite losses, every
step logged, PSFT refreshed pi_old), that report.md holds every row and column, that results.json holds
everything, that the target_sft teacher is cached and reused, and that a rerun with the same seed gives
the same numbers.
"""
from __future__ import annotations

import json
import math

import pytest

from qtarget.lab.report import COLUMNS
from qtarget.lab.runner import run_lab
from qtarget.lab.settings import OBJECTIVES, settings_for

ROWS = ("base",) + OBJECTIVES


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lab_tiny")
    cache = tmp_path_factory.mktemp("lab_cache")
    settings = settings_for("tiny")
    results = run_lab(settings, out, progress=False, cache_dir=cache)
    return settings, out, cache, results


def _expected_changed_fraction(settings) -> float:
    from qtarget.lab.finetune import set_trainable
    from qtarget.models import load_tokenizer, tiny_causal_lm

    model = tiny_causal_lm(load_tokenizer("smollm2"), hidden_size=64, num_layers=2, num_heads=4, seed=settings.seed)
    set_trainable(model, settings.train_top_layers)
    flags = [p.requires_grad for _, p in model.named_parameters()]
    return sum(flags) / len(flags)


def test_every_objective_trained(tiny_run):
    settings, _, _, results = tiny_run
    expected = _expected_changed_fraction(settings)
    assert 0 < expected < 1
    for name in OBJECTIVES:
        (run,) = results["rows"][name]["runs"]
        assert run["changed_param_tensors"] == pytest.approx(expected), name  # trainable ones moved, frozen did not
        history = run["history"]
        assert [h["step"] for h in history] == list(range(1, settings.steps + 1)), name
        for h in history:
            for key in ("loss", "nll", "p_y", "entropy", "gamma"):
                assert math.isfinite(h[key]), (name, key, h)
        assert run["params"]["trainable"] < run["params"]["total"]
    assert results["rows"]["psft"]["runs"][0]["psft_refreshes"] == settings.steps // settings.psft_updates_per_batch
    assert all("clip_frac" in h for h in results["rows"]["psft"]["runs"][0]["history"])
    assert all("kl_ref" in h for h in results["rows"]["asft"]["runs"][0]["history"])
    assert all("kl_teacher" in h for h in results["rows"]["target_sft"]["runs"][0]["history"])


def test_report_has_every_row_and_column(tiny_run):
    _, out, _, _ = tiny_run
    text = (out / "report.md").read_text()
    table = [line for line in text.splitlines() if line.startswith("|")]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert header == ["objective"] + [c[0] for c in COLUMNS]
    body = {line.strip("|").split("|")[0].strip(): line for line in table[2:]}
    assert list(body) == list(ROWS)
    for name, line in body.items():
        cells = [c.strip() for c in line.strip("|").split("|")][1:]
        assert len(cells) == len(COLUMNS)
        # evaluation columns are filled for every row; training columns for every trained row
        assert all(c != "—" for c in cells[:4]), line
        if name != "base":
            assert all(c != "—" for c in cells), line
    assert "Teacher for target_sft" in text and "trained in this run" in text
    for png in ("curves.png", "accuracy.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_json_holds_everything(tiny_run):
    settings, out, _, results = tiny_run
    data = json.loads((out / "results.json").read_text())
    assert set(data["rows"]) == set(ROWS)
    assert set(data["summary"]) == set(ROWS)
    assert data["settings"]["preset"] == "tiny" and data["settings"]["objectives"] == list(OBJECTIVES)
    assert data["teacher"]["cached"] is False and data["teacher"]["description"]
    for name in ROWS:
        m = data["rows"][name]["runs"][0]["metrics"]
        assert m["in_domain"]["n"] == settings.eval_in_domain and m["ood"]["n"] == settings.eval_ood
        assert len(m["in_domain"]["samples"]) == settings.eval_in_domain
        assert 0.0 <= m["in_domain"]["accuracy"] <= 1.0 and 0.0 <= m["ood"]["accuracy"] <= 1.0
        assert m["heldout"]["entropy"] > 0 and m["heldout"]["nll"] > 0
        for _, key, _ in COLUMNS:
            assert key in data["summary"][name]
    for key in ("load_model", "total", "cpu"):
        assert data["timings"][key] >= 0
    assert sum(data["data"]["noise_counts_seed0"].values()) == settings.train_examples


def test_rerun_is_deterministic_and_reuses_the_cached_teacher(tiny_run, tmp_path):
    settings, _, cache, first = tiny_run
    again = run_lab(settings_for("tiny", objectives=("psft", "target_sft")), tmp_path, progress=False,
                    cache_dir=cache)
    assert again["teacher"]["cached"] is True
    assert again["teacher"]["key"] == first["teacher"]["key"]
    assert "loaded from the cache" in (tmp_path / "report.md").read_text()
    for name in ("base", "psft", "target_sft"):
        a, b = first["rows"][name]["runs"][0], again["rows"][name]["runs"][0]
        assert a["metrics"]["heldout"] == b["metrics"]["heldout"], name
        assert a["metrics"]["in_domain"]["samples"] == b["metrics"]["in_domain"]["samples"], name
        if name != "base":
            strip = lambda hist: [{k: v for k, v in h.items() if k not in ("tokens_per_s",)} for h in hist]  # noqa: E731
            assert strip(a["history"]) == strip(b["history"]), name
