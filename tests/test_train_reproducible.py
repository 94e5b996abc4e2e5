"""Nothing silent across runs: `--seed` fixes a LoRA run bit for bit, and a run killed after a checkpoint
and resumed equals the uninterrupted run in its losses, its final weights and every metrics file."""
from __future__ import annotations

import csv
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from qtarget.data import prepare_data
from qtarget.training import train
from test_train_support import config, tiny, tokenizer, toy_rows

LORA = dict(use_lora=True, lora_r=4, lora_alpha=8.0, lora_dropout=0.1, lora_target_modules=["q_proj", "v_proj"])


def is_timing(key: str) -> bool:
    """Wall-clock figures (tokens_per_s, eval_runtime, eval_samples_per_second, ...): differ between any two runs."""
    return key.endswith(("_runtime", "_per_second", "_per_s"))


class Killed(RuntimeError):
    pass


class KillAt(TrainerCallback):
    """Dies once optimizer step `step` is logged, as a killed process would: no on_train_end, no final model."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.global_step >= self.step:
            raise Killed(f"killed at step {state.global_step}")


def adapter(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def jsonl_rows(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def csv_rows(folder) -> list[dict]:
    with (folder / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not is_timing(k)} for r in rows]


def assert_same_rows(got: list[dict], want: list[dict], what: str) -> None:
    """Same events in the same order, each with the same keys and values (floats to 1e-6 relative)."""
    got, want = without_timing(got), without_timing(want)
    assert [(r["step"], "eval_loss" in r) for r in got] == [(r["step"], "eval_loss" in r) for r in want], what
    for g, w in zip(got, want):
        assert g.keys() == w.keys(), (what, g["step"])
        for k in w:
            if isinstance(w[k], float):
                assert float(g[k]) == pytest.approx(w[k], rel=1e-6, abs=1e-9), (what, g["step"], k)
            else:
                assert g[k] == w[k], (what, g["step"], k)


def test_two_identical_lora_runs_are_bit_identical(tmp_path):
    tok = tokenizer()
    data = prepare_data(toy_rows(16), tok, max_length=64)
    runs = []
    for name in ("a", "b"):
        torch.manual_seed(1234 if name == "a" else 99)  # whatever the caller's RNG state: only --seed counts
        cfg = config(tmp_path / name, objective="dft", max_steps=4, per_device_train_batch_size=4, **LORA)
        runs.append(train(cfg, model=tiny(), tokenizer=tok, train_dataset=data.train))
    a, b = runs
    assert [r["loss"] for r in a.history] == [r["loss"] for r in b.history]
    wa, wb = adapter(a.final_dir), adapter(b.final_dir)
    assert wa.keys() == wb.keys() and any("lora_A" in k for k in wa)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # another seed draws another adapter (the test above can fail)
    other = train(config(tmp_path / "c", objective="dft", max_steps=4, per_device_train_batch_size=4, seed=1, **LORA),
                  model=tiny(), tokenizer=tok, train_dataset=data.train)
    assert not all(torch.equal(wa[k], adapter(other.final_dir)[k]) for k in wa)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_killed_and_resumed_run_equals_uninterrupted_run(tmp_path, lora):
    tok = tokenizer()
    data = prepare_data(toy_rows(24), tok, max_length=64, eval_fraction=0.25, seed=0)
    kw = dict(objective="dft", max_steps=7, save_strategy="steps", save_steps=3, per_device_train_batch_size=2,
              eval_strategy="steps", eval_steps=2, plot=True, **(LORA if lora else {}))
    full = train(config(tmp_path / "full", **kw), model=tiny(), tokenizer=tok, train_dataset=data.train,
                 eval_dataset=data.eval)

    cut = tmp_path / "cut"
    with pytest.raises(Killed):
        train(config(cut, **kw), model=tiny(), tokenizer=tok, train_dataset=data.train, eval_dataset=data.eval,
              callbacks=[KillAt(5)])
    assert (cut / "checkpoint-3").is_dir() and not (cut / "checkpoint-6").exists()
    assert [r["step"] for r in jsonl_rows(cut) if "eval_loss" not in r] == [1, 2, 3, 4, 5]  # logged before the kill
    # a LoRA checkpoint holds the adapter only: the base model is loaded as at the start; a full checkpoint holds
    # every weight, so a differently initialised model must not matter
    resumed = train(config(cut, resume="last", **kw), model=tiny(seed=0 if lora else 5), tokenizer=tok,
                    train_dataset=data.train, eval_dataset=data.eval)

    assert [r["step"] for r in resumed.history] == list(range(1, 8))  # the whole run, each step once
    assert [r["loss"] for r in resumed.history] == pytest.approx([r["loss"] for r in full.history], rel=1e-6)
    assert_same_rows(jsonl_rows(cut), jsonl_rows(tmp_path / "full"), "metrics.jsonl")
    assert_same_rows(resumed.history, full.history, "history (what curves.png plots)")
    assert_same_rows(resumed.eval_history, full.eval_history, "eval history")
    assert {2, 4, 6} <= {r["step"] for r in resumed.eval_history}
    got_csv, want_csv = csv_rows(cut), csv_rows(tmp_path / "full")
    assert [r["step"] for r in got_csv] == [str(s) for s in range(1, 8)]
    assert_same_rows([{k: float(v) for k, v in r.items() if v} for r in got_csv],
                     [{k: float(v) for k, v in r.items() if v} for r in want_csv], "metrics.csv")
    assert (cut / "curves.png").stat().st_size > 0
    if lora:
        got, want = adapter(resumed.final_dir), adapter(full.final_dir)
        assert all(torch.allclose(got[k], want[k], rtol=0, atol=1e-6) for k in want)
    else:
        got = load_file(str(resumed.final_dir / "model.safetensors"))
        want = load_file(str(full.final_dir / "model.safetensors"))
        assert max(float((got[k] - want[k]).abs().max()) for k in want) < 1e-6
