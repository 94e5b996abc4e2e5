"""`prompt_loss_weight` (WIT, arXiv 2507.07817): the tokens outside the response are supervised at their
own weight with any objective. Off (0) is today's behaviour bit for bit; on, the supervised tokens, the
weights and the normaliser match a hand count on a chat, an Alpaca and a prompt/completion row."""
from __future__ import annotations

import pytest
import torch
import yaml

import qtarget
from qtarget.data import Collator
from qtarget.data.tokenize import IGNORE_INDEX, TokenizeOptions, tokenize_row
from qtarget.ops import fused_token_loss
from qtarget.training import train
from test_train_support import config, params, tiny, tokenizer, toy_rows

CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                     {"role": "assistant", "content": "It is 4."}]}
ALPACA = {"instruction": "Add the numbers.", "input": "2 and 2", "output": "4"}
COMPLETION = {"prompt": "Question: 2+2?", "completion": " Answer: 4"}
W = 0.3


def _row(tok_name, row, fmt, **options):
    return tokenize_row(tokenizer(tok_name), row, fmt, TokenizeOptions(max_length=None, **options))


@pytest.mark.parametrize("tok_name,row,fmt", [("smollm2", CHAT, "messages"), ("gpt2", ALPACA, "alpaca"),
                                              ("gpt2", COMPLETION, "prompt_completion")])
def test_weight_zero_is_todays_tokenisation(tok_name, row, fmt):
    assert _row(tok_name, row, fmt, prompt_loss_weight=0.0) == _row(tok_name, row, fmt)
    assert "loss_weights" not in _row(tok_name, row, fmt, prompt_loss_weight=0.0)


def _hand_count(tok, full_text, response_texts):
    """(tokens of the row, tokens of its responses), each tokenised on its own."""
    n = len(tok(full_text, add_special_tokens=False)["input_ids"])
    return n, sum(len(tok(r, add_special_tokens=False)["input_ids"]) for r in response_texts)


def test_chat_row_supervises_every_token_with_the_prompt_at_its_weight():
    tok = tokenizer("smollm2")
    ex = _row("smollm2", CHAT, "messages", prompt_loss_weight=W)
    n, n_resp = _hand_count(tok, tok.apply_chat_template(CHAT["messages"], tokenize=False), ["It is 4.<|im_end|>\n"])
    assert len(ex["input_ids"]) == n and ex["labels"] == ex["input_ids"]
    assert ex["loss_weights"].count(1.0) == n_resp and ex["loss_weights"].count(W) == n - n_resp
    ones = [t for t, w in zip(ex["input_ids"], ex["loss_weights"]) if w == 1.0]
    assert tok.decode(ones) == "It is 4.<|im_end|>\n"
    assert "Be brief." in tok.decode([t for t, w in zip(ex["input_ids"], ex["loss_weights"]) if w == W])


def test_alpaca_and_prompt_completion_rows():
    tok = tokenizer("gpt2")
    ex = _row("gpt2", COMPLETION, "prompt_completion", prompt_loss_weight=W)
    n_p = len(tok("Question: 2+2?")["input_ids"])
    n_r = len(tok(" Answer: 4", add_special_tokens=False)["input_ids"]) + 1  # + eos
    assert ex["labels"] == ex["input_ids"] and ex["loss_weights"] == [W] * n_p + [1.0] * n_r
    ex = _row("gpt2", ALPACA, "alpaca", prompt_loss_weight=W)
    off = _row("gpt2", ALPACA, "alpaca")
    n_resp = sum(t != IGNORE_INDEX for t in off["labels"])
    assert n_resp == len(tok("4", add_special_tokens=False)["input_ids"]) + 1  # "4" + eos, by hand
    assert ex["input_ids"] == off["input_ids"] and ex["labels"] == ex["input_ids"]
    assert ex["loss_weights"] == [W] * (len(ex["input_ids"]) - n_resp) + [1.0] * n_resp


def test_loss_is_the_weighted_sum_over_all_supervised_tokens():
    """loss = sum_t w_t l_t / N with N = every supervised (shifted) position, prompt ones included (WIT's
    normaliser), for the patched model's fused loss and for the full-logits path, with any objective."""
    tok = tokenizer("gpt2")
    rows = [_row("gpt2", COMPLETION, "prompt_completion", prompt_loss_weight=W),
            _row("gpt2", ALPACA, "alpaca", prompt_loss_weight=W)]
    batch = Collator(tok.pad_token_id or tok.eos_token_id)(rows)
    n_sup = sum(len(r["input_ids"]) - 1 for r in rows)  # position 0 is never predicted
    assert int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) == n_sup
    model = tiny()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.detach()
    for name in ("sft", "dft", "talr"):
        per_token = qtarget.token_loss(name, logits[:, :-1], batch["labels"][:, 1:], reduction="sum").per_token
        want = (per_token.double() * batch["loss_weights"][:, 1:].double()).sum() / n_sup
        got = qtarget.token_loss(name, logits[:, :-1], batch["labels"][:, 1:], normalizer=n_sup,
                                 loss_weights=batch["loss_weights"][:, 1:]).loss
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-7)
        patched = qtarget.patch(tiny(), name)
        out = patched(**batch, num_items_in_batch=n_sup)
        torch.testing.assert_close(out.loss.double(), want, rtol=1e-5, atol=1e-6)


def test_fused_equals_full_logits_with_loss_weights():
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 7, 16, generator=g, requires_grad=True)
    head = torch.randn(300, 16, generator=g)
    labels = torch.randint(0, 300, (2, 7), generator=g)
    labels[0, :2] = IGNORE_INDEX
    lw = torch.rand(2, 7, generator=g)
    ref = torch.randn(2, 7, 300, generator=g)
    for name in ("sft", "gift", "sed_sft"):
        fused = fused_token_loss(name, hidden, head, labels, loss_weights=lw, ref_logits=ref, chunk_size=3)
        (gf,) = torch.autograd.grad(fused.loss, hidden)
        full = qtarget.token_loss(name, hidden @ head.T, labels, loss_weights=lw, ref_logits=ref)
        (gr,) = torch.autograd.grad(full.loss, hidden)
        torch.testing.assert_close(fused.loss, full.loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gf, gr, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"`loss_weights` has shape \(7,\), expected the labels' shape \(2, 7\)"):
        qtarget.token_loss("sft", hidden @ head.T, labels, loss_weights=lw[0])


def test_weight_zero_trains_bit_for_bit_and_the_run_records_the_weight(tmp_path):
    rows = toy_rows(12)
    models = {}
    for name, extra in (("a", {}), ("b", {"prompt_loss_weight": 0.0}), ("c", {"prompt_loss_weight": 0.5})):
        models[name] = tiny()
        train(config(tmp_path / name, max_steps=2, **extra), model=models[name], tokenizer=tokenizer(),
              train_dataset=rows)
    pa, pb, pc = (params(models[k]) for k in "abc")
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert any(not torch.equal(pa[k], pc[k]) for k in pa)
    recorded = yaml.safe_load((tmp_path / "c" / "config.yaml").read_text())
    assert recorded["prompt_loss_weight"] == 0.5


@pytest.mark.parametrize("overrides,match", [
    ({"prompt_loss_weight": -0.5}, r"prompt_loss_weight"),
    ({"prompt_loss_weight": 0.5, "response_only": False}, r"--prompt_loss_weight needs --response_only true"),
])
def test_bad_prompt_loss_weight_is_named(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        config(tmp_path, **overrides)
    assert not (tmp_path / "config.yaml").exists()
