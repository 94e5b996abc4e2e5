"""Non-finite values: a NaN planted in a weight column is refused at the door naming the row; a NaN
planted mid-training (a forward hook) stops the run at that step with one line naming the step and
the source, keeps the last good checkpoint and metrics.jsonl free of invented rows, and `--resume`
from that checkpoint finishes the run."""
from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import TrainerCallback

from qtarget.cli import main as qtarget_main
from qtarget.training import train
from qtarget.training.trainer import NonFiniteStop
from test_train_support import config, tiny, tokenizer, toy_rows


class PoisonAt(TrainerCallback):
    """Makes the first decoder layer's output NaN during optimizer step `step` (1-based) only."""

    def __init__(self, model, step: int, where: str = "forward"):
        self.step, self.active = step, False
        layer = model.model.layers[0]
        if where == "forward":
            layer.register_forward_hook(lambda m, i, out: self._poison(out))
        else:  # a finite loss whose gradient is not: the backward of the first layer's output turns NaN
            layer.register_full_backward_hook(lambda m, gin, gout: tuple(
                None if g is None else (g * float("nan") if self.active else g) for g in gin))
            layer.register_forward_hook(lambda m, i, out: out)

    def _poison(self, out):
        if not self.active:
            return out
        hidden = out[0] if isinstance(out, tuple) else out
        hidden = hidden * float("nan")
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

    def on_step_begin(self, args, state, control, **kwargs):
        self.active = state.global_step + 1 == self.step


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("where, what", [("forward", "the model's last hidden states contains"),
                                         ("backward", "the gradient norm is nan")])
def test_nan_mid_training_stops_keeps_last_checkpoint_and_resumes(tmp_path, where, what):
    out = tmp_path / "run"
    cfg = dict(max_steps=5, save_strategy="steps", save_steps=1, logging_steps=1)
    model = tiny()
    with pytest.raises(NonFiniteStop) as err:
        train(config(out, **cfg), model=model, tokenizer=tokenizer(), train_dataset=toy_rows(24),
              callbacks=[PoisonAt(model, 3, where)])
    message = str(err.value)
    assert "\n" not in message
    assert f"non-finite value at step 3: {what}" in message
    assert "checkpoint-2 is the last good checkpoint" in message
    checkpoints = sorted(p.name for p in out.glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-1", "checkpoint-2"]
    assert not (out / "final").exists()
    rows = _rows(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]  # no row for the bad step, none invented
    assert all(math.isfinite(r["loss"]) for r in rows)
    # the checkpoint holds the good weights: finite everywhere
    weights = torch.load(out / "checkpoint-2" / "pytorch_model.bin") if (out / "checkpoint-2" / "pytorch_model.bin").exists() else None
    if weights is None:
        from safetensors.torch import load_file

        weights = load_file(str(out / "checkpoint-2" / "model.safetensors"))
    assert all(bool(torch.isfinite(v).all()) for v in weights.values())

    result = train(config(out, resume="last", **cfg), model=tiny(), tokenizer=tokenizer(), train_dataset=toy_rows(24))
    assert result.global_step == 5
    rows = _rows(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert all(math.isfinite(r["loss"]) for r in rows)


def test_nan_in_weight_column_is_refused_naming_the_row(tmp_path, capfd):
    tok = tokenizer()
    model_dir = tmp_path / "model"
    tiny().save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    rows = toy_rows(4)
    for row in rows:
        row["token_weights"] = 1.0
    rows[2]["token_weights"] = float("nan")
    data = tmp_path / "w.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))  # json.dumps writes NaN, which json reads back
    out = tmp_path / "out"
    argv = ["train", "--model", str(model_dir), "--dataset", str(data), "--output_dir", str(out), "--use_cpu",
            "--disable_tqdm", "--max_steps", "1", "--max_length", "48", "--objective", "token_weighted",
            "--plot", "false"]
    capfd.readouterr()
    assert qtarget_main(argv) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "row 2: column 'token_weights'" in err[0] and "nan" in err[0], err
    assert not out.exists()
    rows[2]["token_weights"] = 0.5
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert qtarget_main(argv) == 0
    assert (out / "config.yaml").exists()


def test_a_non_finite_weight_in_tokenised_rows_stops_at_the_first_step_naming_the_column(tmp_path):
    """Rows passed already tokenised skip the data checks: the loss turns NaN and the stop names the column."""
    tok = tokenizer()
    ids = tok("Q: add 2 and 3. A: 5.")["input_ids"] + [tok.eos_token_id]
    examples = [{"input_ids": ids, "labels": [-100] * 5 + ids[5:],
                 "token_weights": [0.0] * 5 + [float("nan")] * (len(ids) - 5)} for _ in range(8)]
    out = tmp_path / "run"
    with pytest.raises(NonFiniteStop, match=r"non-finite value at step 1: the training loss is nan; the batch's token_weights column holds non-finite values; "
                                            r"stopped before the optimizer update, no checkpoint was saved before it"):
        train(config(out, objective="token_weighted", max_steps=2), model=tiny(), tokenizer=tok, train_dataset=examples)
    assert not (out / "final").exists()
    assert not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text().strip()
