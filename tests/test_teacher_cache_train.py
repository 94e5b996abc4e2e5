"""Training from a teacher cache: with k = V it takes the same optimizer steps as training with the
live teacher, and no teacher model is loaded; a cache for other data is refused before training."""
from __future__ import annotations

import pytest

from qtarget.data import prepare_data
from qtarget.models import tiny_causal_lm
from qtarget.teacher_cache import build_cache
from qtarget.training import train
from test_train_support import config, max_param_diff, params, tiny, tokenizer, toy_rows


def teacher():
    return tiny_causal_lm(tokenizer(), hidden_size=48, num_layers=1, num_heads=2, seed=7)


@pytest.mark.parametrize("objective, args", [("target_sft", {"eta": 0.5}), ("kd", {"temperature": 2.0})])
def test_training_from_a_full_cache_equals_the_live_teacher(tmp_path, objective, args):
    tok = tokenizer()
    rows = toy_rows(10)
    data = prepare_data(rows, tok, max_length=48, eval_fraction=0.2, seed=0)  # as train() will prepare them
    build_cache(teacher(), tok, data.train, tmp_path / "cache", top_k=len(tok), rows_per_shard=8, progress=False,
                eval_examples=data.eval, settings={"max_length": 48})
    # plain SGD: parameters differ by lr * (gradient difference); Adam would amplify float32 noise in
    # near-zero gradients (p ~ pi_T on tokens no label hits) into steps of size lr
    common = dict(objective=objective, objective_args=args, max_steps=2, max_length=48, optim="sgd", learning_rate=10.0,
                  eval_fraction=0.2, eval_strategy="steps", eval_steps=2)
    live = train(config(tmp_path / "live", **common), model=tiny(), tokenizer=tok, train_dataset=rows,
                 teacher=teacher(), save_final=False)
    cached = train(config(tmp_path / "cached", teacher_cache=str(tmp_path / "cache"), teacher_tail="renormalize",
                          **common), model=tiny(), tokenizer=tok, train_dataset=rows, save_final=False)
    assert max_param_diff(params(live.trainer.model), params(tiny())) > 1e-3  # training moved the weights
    assert max_param_diff(params(cached.trainer.model), params(live.trainer.model)) <= 1e-5
    for a, b in zip(live.history, cached.history):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert len(cached.eval_history) == 1  # the eval split is read from the cache's "eval" rows
    for key in ("eval_loss", "eval_kl_teacher"):
        assert cached.eval_history[0][key] == pytest.approx(live.eval_history[0][key], rel=1e-4, abs=1e-7), key


def test_a_cache_for_other_data_is_refused_before_training(tmp_path):
    tok = tokenizer()
    data = prepare_data(toy_rows(8), tok, max_length=48)
    build_cache(teacher(), tok, data.train, tmp_path / "cache", top_k=4, progress=False, settings={"max_length": 48})
    cfg = config(tmp_path / "run", objective="target_sft", max_length=12, teacher_cache=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=r"other data.*max_length: cache has 48, this run 12"):
        train(cfg, model=tiny(), tokenizer=tok, train_dataset=toy_rows(8))
    with pytest.raises(ValueError, match="teacher_tail must be one of"):
        config(tmp_path / "run", objective="target_sft", teacher_cache=str(tmp_path / "cache"), teacher_tail="tails")
