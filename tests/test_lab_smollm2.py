"""The lab on the real SmolLM2-135M-Instruct (slow): the 30-layer model trains only its top layers
through the real trainer, the teacher-forced metrics reuse the frozen 24-layer trunk, and the report is
written. Sizes are minimal; the numbers are not checked."""
from __future__ import annotations

import math

import pytest

from qtarget.lab.runner import run_lab
from qtarget.lab.settings import settings_for


@pytest.mark.slow
def test_lab_on_smollm2_minimal(smollm2_path, tmp_path):
    settings = settings_for("quick", objectives=("dft",), tasks=("sum",), steps=2, batch_size=2, train_examples=4,
                            eval_in_domain=2, rank_items=3, ood_texts=3, max_new_tokens=4, eval_batch_size=2,
                            n_boot=200)
    results = run_lab(settings, tmp_path, progress=False, cache_dir=tmp_path / "cache")
    assert results["model"]["model_id"].startswith("smollm2:") and results["model"]["layers"] == 30
    entry = results["per_task"]["sum"]
    assert entry["data"]["shared_trunk_layers"] == 24
    (run,) = entry["rows"]["dft"]["runs"]
    # top 6 decoder layers (9 tensors each) + the final norm moved; nothing else did
    n_tensors = 30 * 9 + 2  # layers + embed (tied with the LM head) + final norm
    assert run["changed_param_tensors"] == pytest.approx((6 * 9 + 1) / n_tensors)
    assert len(run["history"]) == 2 and all(math.isfinite(h["loss"]) for h in run["history"])
    assert len(entry["items"]["dft"]["rank.correct"][0]) == 3
    assert entry["prior"]["tokens"] > 0 and 0 < entry["prior"]["mean"] < 1
    text = (tmp_path / "report.md").read_text()
    assert "| base |" in text and "| dft |" in text
