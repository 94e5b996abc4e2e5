"""HF generation on a tiny random model: seeding, left padding, the cut flag, token entropy."""
from __future__ import annotations

import pytest
import torch

from qtarget.evaluation.generation import HFGenerator, token_entropy
from qtarget.models import tiny_causal_lm


# decode single-threaded (see the `one_torch_thread` fixture in conftest.py)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tok(smollm2_tokenizer):
    return smollm2_tokenizer


@pytest.fixture(scope="module")
def model(tok):
    m = tiny_causal_lm(tok, hidden_size=32, num_layers=2, num_heads=4, seed=1)
    with torch.no_grad():  # sharpen the random LM so greedy/entropy are not all ~log V
        m.lm_head.weight.mul_(40.0)
    return m


@pytest.fixture(scope="module")
def prompts(tok):
    texts = ["Hi", "What is two plus two? Think step by step please.", "The cat sat on the"]
    return [tok(t)["input_ids"] for t in texts]


def test_batched_left_padded_greedy_equals_one_by_one(model, tok, prompts):
    assert len({len(p) for p in prompts}) == 3  # really different lengths -> real padding
    gen = HFGenerator(model, tok, batch_size=3)
    batched = gen.generate(prompts, max_new_tokens=10)
    single = [gen.generate([p], max_new_tokens=10)[0] for p in prompts]
    for b, s in zip(batched, single):
        assert b.token_ids == s.token_ids
        assert b.text == s.text
        assert b.entropy == pytest.approx(s.entropy, abs=1e-4)


def test_greedy_matches_manual_argmax_decoding(model, tok, prompts):
    gen = HFGenerator(model, tok, batch_size=2)
    out = gen.generate(prompts[:1], max_new_tokens=6)[0]
    ids = torch.tensor([prompts[0]])
    manual = []
    with torch.no_grad():
        for _ in range(6):
            nxt = int(model(ids).logits[0, -1].argmax())
            manual.append(nxt)
            if nxt in gen.eos_token_ids:
                break
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    assert out.token_ids == manual


def test_fixed_seed_gives_identical_samples(model, tok, prompts):
    gen = HFGenerator(model, tok, batch_size=4)
    many = prompts + prompts[:1]  # a repeated prompt gets its own sample
    a = gen.generate(many, max_new_tokens=5, temperature=1.0, seed=7)
    b = gen.generate(many, max_new_tokens=5, temperature=1.0, seed=7)
    c = gen.generate(many, max_new_tokens=5, temperature=1.0, seed=8)
    assert [s.token_ids for s in a] == [s.token_ids for s in b]
    assert [s.token_ids for s in a] != [s.token_ids for s in c]
    assert a[0].token_ids != a[3].token_ids
    # the global RNG is not consumed by seeded generation
    torch.manual_seed(0)
    x = torch.rand(1)
    torch.manual_seed(0)
    gen.generate(prompts[:1], max_new_tokens=2, temperature=1.0, seed=3)
    assert torch.equal(torch.rand(1), x)


def test_cut_at_limit_flag(model, tok, prompts):
    gen = HFGenerator(model, tok, batch_size=3)
    free = gen.generate(prompts, max_new_tokens=6)
    assert all(s.cut and s.num_tokens == 6 for s in free)
    # make the 3rd greedy token of prompt 0 the EOS: generation stops there and is not cut
    stop = free[0].token_ids[2]
    assert stop not in free[0].token_ids[:2]
    gen_eos = HFGenerator(model, tok, batch_size=3, eos_token_ids=[stop])
    out = gen_eos.generate(prompts, max_new_tokens=6)
    assert out[0].token_ids == free[0].token_ids[:3]
    assert out[0].num_tokens == 3 and not out[0].cut
    assert out[0].text == tok.decode(free[0].token_ids[:2], skip_special_tokens=True)
    for s, f in zip(out[1:], free[1:]):
        expect_cut = stop not in f.token_ids
        assert s.cut == expect_cut
        assert s.num_tokens == (6 if expect_cut else f.token_ids.index(stop) + 1)


def test_entropy_equals_forward_pass_entropy(model, tok, prompts):
    gen = HFGenerator(model, tok, batch_size=3)
    outs = gen.generate(prompts, max_new_tokens=8)
    for p, s in zip(prompts, outs):
        full = torch.tensor([list(p) + s.token_ids])
        with torch.no_grad():
            logits = model(full).logits[0].double()  # [T, V]
        # positions whose next-token distribution produced each generated token
        pos = logits[len(p) - 1 : len(p) - 1 + s.num_tokens]
        prob = pos.softmax(-1)
        ref = float(-(prob * pos.log_softmax(-1)).sum(-1).mean())
        assert 0.05 < ref < 10.0  # a meaningful, non-uniform entropy
        assert s.entropy == pytest.approx(ref, rel=1e-4, abs=1e-4)


def test_token_entropy_handles_masked_logits():
    z = torch.tensor([[0.0, 0.0, float("-inf")]])
    assert token_entropy(z).item() == pytest.approx(torch.log(torch.tensor(2.0)).item())


def test_bad_parameters(model, tok, prompts):
    gen = HFGenerator(model, tok)
    with pytest.raises(ValueError, match="max_new_tokens"):
        gen.generate(prompts, max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        gen.generate(prompts, max_new_tokens=2, temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        gen.generate(prompts, max_new_tokens=2, temperature=1.0, top_p=0)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        gen.generate([prompts[0], []], max_new_tokens=2)


@pytest.mark.slow
def test_smollm2_batched_greedy_equals_one_by_one(smollm2_path):
    from transformers import AutoModelForCausalLM

    from qtarget.evaluation.benchmarks import load_benchmark
    from qtarget.evaluation.prompts import prompt_ids
    from qtarget.models import load_tokenizer

    tok = load_tokenizer("smollm2")
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_path), dtype=torch.float32).eval()
    problems = load_benchmark("gsm8k_100", limit=2)
    prompts = [prompt_ids(tok, p) for p in problems]
    assert len(prompts[0]) != len(prompts[1])
    gen = HFGenerator(model, tok, batch_size=2)
    batched = gen.generate(prompts, max_new_tokens=8)
    single = [gen.generate([p], max_new_tokens=8)[0] for p in prompts]
    assert [s.token_ids for s in batched] == [s.token_ids for s in single]
    assert all(s.text.strip() for s in batched)  # the instruct model answers in words
