"""The lab's precision (`qtarget.lab.precision`): bf16 matrix products under autocast, the same for every
row. The generation copy computes exactly what autocast computes on the float32 model; training and scoring
in bf16 stay within bf16 rounding of float32 (bounds below); bad values are named."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import qtarget.lab.precision as precision_module
from qtarget.lab import tasks
from qtarget.lab.finetune import finetune
from qtarget.lab.metrics import Scorer, trunk_split
from qtarget.lab.precision import compute_context, inference_model, prepare_model
from qtarget.lab.runner import load_base, tokenize
from qtarget.lab.settings import settings_for

U = 2.0 ** -8  # bf16 unit roundoff


@pytest.fixture(scope="module")
def setup():
    settings = settings_for("tiny", steps=3, train_top_layers=1)
    base, tok, _ = load_base(settings)
    rows = tasks.demonstrations(tasks.shop_problems(8, seed=3), noise=0.25, seed=3)
    examples = tokenize(tok, rows, settings.max_length, tasks.INSTRUCTION)
    return settings, base, tok, examples


def test_generation_copy_is_autocast_bit_for_bit_and_leaves_the_model_alone(setup):
    _, base, tok, examples = setup
    tied = base.get_output_embeddings().weight is base.get_input_embeddings().weight
    fast = inference_model(base, "bf16")
    assert inference_model(base, "fp32") is base
    ids = torch.tensor([examples[0]["input_ids"]])
    with torch.no_grad(), compute_context("bf16", base):
        want = base(input_ids=ids).logits
        got = fast(input_ids=ids).logits
        want_gen = base.generate(input_ids=ids[:, :20], max_new_tokens=6, do_sample=False, pad_token_id=0)
        got_gen = fast.generate(input_ids=ids[:, :20], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)
    assert torch.equal(got_gen, want_gen)
    # the base model keeps its float32 weights (and its head tied or not, as it was)
    assert all(p.dtype == torch.float32 for p in base.parameters())
    assert (base.get_output_embeddings().weight is base.get_input_embeddings().weight) == tied
    assert fast.get_input_embeddings().weight.dtype == torch.float32
    assert fast.get_output_embeddings().weight.dtype == torch.bfloat16


def test_bf16_scores_are_within_bf16_rounding_of_float64(setup):
    settings, base, tok, examples = setup
    split = trunk_split(base, 1)
    with compute_context("bf16", base):
        scores = Scorer(base, examples[:4], pad_token_id=tok.pad_token_id, split=split, batch_size=2).base_scores
    ref = base.double()
    try:
        for ex, sc in zip(examples[:4], scores):
            with torch.no_grad():
                logits = ref(input_ids=torch.tensor([ex["input_ids"]])).logits[0, :-1]
            labels = torch.tensor(ex["labels"][1:])
            keep = labels != -100
            logp = torch.log_softmax(logits[keep], -1).gather(-1, labels[keep, None])[:, 0].numpy()
            # each bf16-rounded product moves a logit by <= U * its scale; a few of them lie on the path to the
            # logits of a 2-layer model (q, k, v, o, gate, up, down per layer, the head), and log p moves by at
            # most twice the largest logit change
            scale = float(logits.abs().max())
            assert np.abs(sc.logp - logp).max() <= 2 * U * 17 * scale
            assert np.abs(sc.logp - logp).max() > 0  # bf16 did run
    finally:
        base.float()


def test_bf16_training_tracks_the_float32_run(setup, tmp_path):
    settings, base, tok, examples = setup
    runs = {}
    for precision in ("fp32", "bf16"):
        s = settings_for("tiny", steps=3, train_top_layers=1, precision=precision)
        model, run = finetune(s, base, tok, examples, "sft", 0, tmp_path / precision)
        runs[precision] = ([h["loss"] for h in run["history"]], model)
    (l32, m32), (l16, m16) = runs["fp32"], runs["bf16"]
    assert l16 != l32  # bf16 did run
    # the first step's loss is the same weights' loss: within bf16 rounding; later steps drift a little more
    assert l16[0] == pytest.approx(l32[0], rel=8 * U)
    for a, b in zip(l32[1:], l16[1:]):
        assert b == pytest.approx(a, rel=32 * U)
    # the trained weights stay float32, and bf16's update points where float32's does: Adam normalises each
    # weight's step, so a weight with a near-zero gradient may step differently; over a whole tensor the two
    # updates agree to ~1 % of the update's norm (measured: 0.4-1.2 %)
    for (name, p), q, b in zip(m32.named_parameters(), m16.parameters(), base.parameters()):
        assert q.dtype == torch.float32
        d32, d16 = (p - b).flatten(), (q - b).flatten()
        if d32.norm() > 0:
            assert (d16 - d32).norm() <= 0.05 * d32.norm(), name


def test_a_bad_precision_is_named():
    with pytest.raises(ValueError, match="--precision must be one of auto, bf16, fp32"):
        settings_for("tiny", precision="fp16")


def test_bf16_on_a_cpu_uses_eager_attention_with_the_same_math(setup):
    _, base, tok, examples = setup
    model = inference_model(base, "bf16")  # a copy to switch
    assert prepare_model(model, "fp32").config._attn_implementation == base.config._attn_implementation
    ids = torch.tensor([examples[0]["input_ids"], examples[1]["input_ids"][:len(examples[0]["input_ids"])]])
    with torch.no_grad(), compute_context("bf16", model):
        sdpa = model(input_ids=ids).logits.float()
        prepare_model(model, "bf16")
        assert model.config._attn_implementation == "eager"
        eager = model(input_ids=ids).logits.float()
    # the same attention: only the order of bf16 roundings differs
    assert (eager - sdpa).abs().max() <= 16 * U * sdpa.abs().max()
    assert base.config._attn_implementation != "eager"


def test_the_precast_frozen_head_trains_exactly_as_autocast_does(setup, tmp_path, monkeypatch):
    import contextlib

    import qtarget.lab.finetune as finetune_module

    _, base, tok, examples = setup
    tied_base = copy.deepcopy(base)
    tied_base.get_output_embeddings().weight = tied_base.get_input_embeddings().weight  # tied, as SmolLM2's
    s = settings_for("tiny", steps=3, train_top_layers=1, precision="bf16")
    seen = []
    fast_model, fast = finetune(s, tied_base, tok, examples, "sft", 0, tmp_path / "fast", checkpoints=(2,),
                       on_checkpoint=lambda step, m: seen.append(m.get_output_embeddings().weight.dtype))
    monkeypatch.setattr(finetune_module, "bf16_head", lambda model, precision: contextlib.nullcontext())
    model, plain = finetune(s, tied_base, tok, examples, "sft", 0, tmp_path / "plain")
    assert seen == [torch.bfloat16]  # the head held its bf16 copy during training
    assert [h["loss"] for h in fast["history"]] == [h["loss"] for h in plain["history"]]
    # and its own, tied weight afterwards
    for m in (fast_model, model):
        assert m.get_output_embeddings().weight is m.get_input_embeddings().weight


@pytest.mark.parametrize("flags, expected", [({"avx2", "avx512f", "avx512_bf16"}, "bf16"), ({"avx2", "amx_bf16"}, "bf16"),
                                             ({"avx2", "fma"}, "fp32"), ({"avx2", "avx512f"}, "fp32"), (set(), "fp32")])
def test_auto_precision_is_bf16_only_where_the_cpu_multiplies_bf16_natively(monkeypatch, flags, expected):
    """auto resolves when the settings are made (the digest, results.json and the teacher key see bf16 or fp32,
    never auto); an explicit bf16 or fp32 is kept on any CPU."""
    monkeypatch.setattr(precision_module, "cpu_flags", lambda: set(flags))
    assert settings_for("tiny").precision == expected
    assert settings_for("tiny", precision="auto").precision == expected
    assert settings_for("tiny", precision="bf16").precision == "bf16"
    assert settings_for("tiny", precision="fp32").precision == "fp32"


def test_cpu_flags_read_this_machine():
    flags = precision_module.cpu_flags()
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        assert flags == set()
        return
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), None)
    assert flags == (set(line.partition(":")[2].split()) if line else set())
