"""The lab's teacher-forced metrics against independent computation, and the noise-fit metric on a
planted case: a model trained only on the corrupted tokens must gain there and not on clean tokens."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from qtarget.lab import tasks
from qtarget.lab.analysis import estimate
from qtarget.lab.metrics import (IGNORE, Scorer, changed_tokens, chat_sequence, noise_fit_items, prior_profile, ranking_items,
                                 text_sequence)
from qtarget.models import load_tokenizer, tiny_causal_lm


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("smollm2")


@pytest.fixture(scope="module")
def demos(tok):
    rows = tasks.demonstrations(tasks.shop_problems(40, 5), 0.5, 5)
    seqs = [chat_sequence(tok, r["prompt"], r["response"], 192, instruction=tasks.INSTRUCTION) for r in rows]
    # noisy rows vs their clean version; clean rows vs the corruption they did not get (the matched control)
    changed = [changed_tokens(s, chat_sequence(tok, r["prompt"], r.get("counterfactual_response", r["clean_response"]),
                                               192, instruction=tasks.INSTRUCTION)) for r, s in zip(rows, seqs)]
    return rows, seqs, changed


def reference_scores(model, seq):
    """log p and entropy of the scored tokens from one plain full forward (no trunk, no batching)."""
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([seq["input_ids"]])).logits[0, :-1].float(), -1)
    labels = torch.tensor(seq["labels"][1:])
    keep = labels != IGNORE
    lp = logp[keep].gather(-1, labels[keep, None]).squeeze(-1)
    ent = -(logp[keep].exp() * logp[keep]).sum(-1)
    return lp.numpy(), ent.numpy()


def test_scorer_with_shared_trunk_matches_a_plain_forward(tok, demos):
    seqs = demos[1][:12]
    base = tiny_causal_lm(tok, hidden_size=64, num_layers=3, num_heads=4, seed=1).eval()
    model = copy.deepcopy(base)
    with torch.no_grad():
        for p in model.get_decoder().layers[2].parameters():   # only the top layer differs
            p.add_(0.1 * torch.randn_like(p))
    scorer = Scorer(base, seqs, pad_token_id=tok.pad_token_id, split=2, batch_size=5)
    for m, scores in ((base, scorer.base_scores), (model, scorer.score(model))):
        for seq, s in zip(seqs, scores):
            lp, ent = reference_scores(m, seq)
            np.testing.assert_allclose(s.logp, lp, atol=2e-5)
            np.testing.assert_allclose(s.entropy, ent, atol=2e-5)
    with torch.no_grad():
        model.get_decoder().layers[0].mlp.up_proj.weight.add_(0.01)   # a trunk layer differs: refused
    with pytest.raises(ValueError, match="trunk"):
        scorer.score(model)


def test_changed_tokens_mark_what_the_corruption_changed(tok, demos):
    rows, seqs, changed = demos
    digits_only = 0
    for r, s, mask in zip(rows, seqs, changed):
        scored = [t for t in s["labels"][1:] if t != IGNORE]
        assert len(mask) == len(scored) and mask.any(), r
        assert (r["response"] != r["clean_response"]) == (r["noise"] != "clean")
        if r["noise"] in ("corrupt", "clean"):
            # result digits: the wrong ones of a corrupted demonstration, the right ones (that a corruption
            # would change) of a clean one; a sign change may mark the space before a number
            text = "".join(tok.decode([t]) for t, c in zip(scored, mask) if c)
            assert set(text) <= set("0123456789- "), (r["noise"], r["response"], text)
            digits_only += text.isdigit()
    assert digits_only >= 0.8 * sum(r["noise"] != "alternative" for r in rows)


@pytest.mark.parametrize("task_name", ["glyph", "sum"])
def test_changed_tokens_of_the_other_tasks_are_result_digits(tok, task_name):
    """In glyph's compact notation (no spaces, ';' between steps) and in sum's, what a corruption changed is
    result digits: the wrong ones of a corrupted demonstration, the right ones of a clean one (a carried error
    changes every later result; where a result gains or loses a digit the alignment may take a neighbour)."""
    from qtarget.lab.builtin_tasks import build_task
    from qtarget.lab.settings import settings_for

    task = build_task(task_name, settings_for("tiny"))
    rows = [r for r in task.demonstrations(3, 40, 0.5) if r["noise"] != "alternative"]
    marked = []
    for r in rows:
        seq = chat_sequence(tok, r["prompt"], r["response"], 192, instruction=task.instruction)
        other = chat_sequence(tok, r["prompt"], r.get("counterfactual_response", r["clean_response"]), 192,
                              instruction=task.instruction)
        mask = changed_tokens(seq, other)
        scored = [t for t in seq["labels"][1:] if t != IGNORE]
        text = "".join(tok.decode([t]) for t, c in zip(scored, mask) if c)
        assert mask.any() and any(c.isdigit() for c in text), (r["response"], text)
        marked += [c for c in text if c != " "]
    assert sum(c.isdigit() for c in marked) >= 0.9 * len(marked)


def test_changed_tokens_of_an_inserted_digit(tok):
    a = chat_sequence(tok, "q", "8 - 2 = 6. The answer is 6.", 64, instruction=None)
    b = chat_sequence(tok, "q", "8 - 2 = 16. The answer is 16.", 64, instruction=None)
    scored = [t for t in a["labels"][1:] if t != IGNORE]
    mask = changed_tokens(a, b)
    assert [tok.decode([t]) for t, c in zip(scored, mask) if c] == ["6", "6"]


def test_noise_fit_on_a_planted_case(tok, demos):
    """Train only on the corrupted tokens (all other labels masked): the corrupted-token gain must be
    positive and above the clean-token gain, so the noise-fit statistic is clearly > 0."""
    rows, seqs, changed = demos
    base = tiny_causal_lm(tok, hidden_size=64, num_layers=2, num_heads=4, seed=2).eval()
    model = copy.deepcopy(base)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.get_decoder().layers[1].parameters():
        p.requires_grad_(True)
    planted = []
    for r, s, mask in zip(rows, seqs, changed):
        if r["noise"] != "corrupt":
            continue
        scored_pos = [i for i, t in enumerate(s["labels"]) if t != IGNORE and i > 0]
        labels = [IGNORE] * len(s["labels"])
        for pos, c in zip(scored_pos, mask):
            if c:
                labels[pos] = s["labels"][pos]
        planted.append((torch.tensor([s["input_ids"]]), torch.tensor([labels])))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    # 16 passes: the fit must clear the 0.5 margin whatever the tiny model's initialisation (8 passes left
    # it at 0.47 with transformers 5.25's initialisation; 16 pass for model seeds 2-6)
    for _ in range(16):
        for ids, labels in planted:
            opt.zero_grad()
            model(input_ids=ids, labels=labels).loss.backward()
            opt.step()
    model.eval()
    scorer = Scorer(base, seqs, pad_token_id=tok.pad_token_id, split=1, batch_size=8)
    items = noise_fit_items(scorer.score(model), scorer.base_scores, [r["noise"] for r in rows], changed)
    assert len(items["corrupt"]) == sum(r["noise"] == "corrupt" for r in rows) > 0
    assert items["corrupt"].mean() > 0.5                       # the planted fit shows up where it was planted
    assert items["corrupt"].mean() > items["clean"].mean() + 0.5
    est = estimate({"m": {"noise.corrupt": items["corrupt"][None], "noise.clean": items["clean"][None]}},
                   "noise_fit", "m", n_boot=500, seed=0)
    assert est.value == pytest.approx(items["corrupt"].mean() - items["clean"].mean())
    assert est.lo > 0


def test_ranking_items_and_text_sequences(tok):
    from qtarget.lab.metrics import TokenScores

    scores = [TokenScores(np.array(v, float), np.array([0.5] * len(v))) for v in
              ([-1.0, -1.0], [-3.0], [-0.5, -2.0],       # item 0: correct total -2 beats -3 and -2.5
               [-4.0], [-1.0], [-5.0])]                  # item 1: a distractor wins
    r = ranking_items(scores, 3)
    assert r["correct"].tolist() == [1.0, 0.0]
    assert r["nll"].tolist() == [1.0, 4.0] and r["entropy"].tolist() == [0.5, 0.5]
    seq = text_sequence(tok, "Return a new list containing all items from the iterable in ascending order.", 8)
    assert len(seq["input_ids"]) == 8 and seq["labels"][0] == IGNORE and seq["labels"][1:] == seq["input_ids"][1:]


def test_ranking_candidates_are_distinct_and_wrong(tok):
    items = tasks.ranking_items(tasks.shop_problems(20, 3), 2, 3)
    for it in items:
        assert len(it["candidates"]) == 3 and len(set(it["answers"])) == 3
        assert tasks.stated_answer(it["candidates"][0]) == it["answers"][0]
        assert [tasks.stated_answer(c) for c in it["candidates"]] == it["answers"]
    assert tasks.stated_answer("3 + 4 = 7.") is None           # no 'answer is': a format failure, no fallback


def test_prior_profile_matches_a_direct_computation(tok, demos):
    """The prior profile from the Scorer's base scores == p_y of every demonstration token from plain float64
    softmaxes of full forwards, one sequence at a time."""
    seqs = demos[1][:10]
    base = tiny_causal_lm(tok, hidden_size=64, num_layers=3, num_heads=4, seed=4).eval()
    profile = prior_profile(Scorer(base, seqs, pad_token_id=tok.pad_token_id, split=2, batch_size=4).base_scores)
    direct = []
    for seq in seqs:
        with torch.no_grad():
            logits = base(input_ids=torch.tensor([seq["input_ids"]])).logits[0, :-1].double()
        labels = torch.tensor(seq["labels"][1:])
        keep = labels != IGNORE
        direct.append(torch.softmax(logits[keep], -1).gather(-1, labels[keep, None]).squeeze(-1).numpy())
    p = np.concatenate(direct)
    assert profile["tokens"] == p.size
    assert profile["mean"] == pytest.approx(p.mean(), abs=1e-5)
    assert profile["median"] == pytest.approx(np.median(p), abs=1e-5)
    assert profile["share_low"] == pytest.approx((p < 0.1).mean())
    assert profile["histogram"] == np.histogram(p, bins=10, range=(0, 1))[0].tolist()
    # p_y spread over [0, 1] (a random tiny model puts every p_y near 0): the statistics and bins of known values
    from qtarget.lab.metrics import TokenScores

    py = [np.array([0.05, 0.55, 0.95]), np.array([0.01, 0.15, 0.32, 0.99, 0.75])]
    spread = prior_profile([TokenScores(np.log(v), np.zeros_like(v)) for v in py])
    flat = np.concatenate(py)
    assert spread["share_low"] == pytest.approx(2 / 8) and spread["median"] == pytest.approx(np.median(flat))
    assert spread["histogram"] == [2, 1, 0, 1, 0, 1, 0, 1, 0, 2] and spread["q1"] == pytest.approx(np.quantile(flat, 0.25))
    with pytest.raises(ValueError, match="no token scores"):
        prior_profile([])
