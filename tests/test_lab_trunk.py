"""Training the top layers on the frozen trunk computed once (`qtarget.lab.trunk`) gives the same run as
full forwards: the same losses step by step and the same trained weights, for an objective without and
one with a reference model; checkpoints see the full model."""
from __future__ import annotations

import pytest
import torch

from qtarget.lab import tasks
from qtarget.lab.finetune import finetune
from qtarget.lab.metrics import Scorer, trunk_split
from qtarget.lab.runner import load_base, tokenize
from qtarget.lab.settings import settings_for
from qtarget.lab.trunk import TopOnly, TrunkLookup, bottom_states


@pytest.fixture(scope="module")
def setup():
    # float32: the trunk's equivalence to full forwards is exact up to float32 rounding (bf16: tests/test_lab_precision.py)
    settings = settings_for("tiny", steps=3, train_top_layers=1, precision="fp32")
    base, tok, _ = load_base(settings)
    rows = tasks.demonstrations(tasks.shop_problems(8, seed=2), noise=0.25, seed=2)
    examples = tokenize(tok, rows, settings.max_length, tasks.INSTRUCTION)
    split = trunk_split(base, settings.train_top_layers)
    scorer = Scorer(base, examples, pad_token_id=tok.pad_token_id, split=split, batch_size=3)
    return settings, base, tok, examples, scorer


@pytest.mark.parametrize("objective", ["sft", "asft", "target_sft"])
def test_training_on_the_shared_trunk_matches_full_forwards(setup, tmp_path, objective):
    settings, base, tok, examples, scorer = setup
    seen = []
    teacher = None
    if objective == "target_sft":  # a teacher that shares the trunk (its top layer trained): its top-k cache is
        # built on the trunk in one run and with full forwards in the other
        teacher, _ = finetune(settings, base, tok, examples, "sft", 1, tmp_path / "teacher", steps=2)
    full, full_run = finetune(settings, base, tok, examples, objective, 0, tmp_path / "full" / "run", teacher=teacher)
    cut, cut_run = finetune(settings, base, tok, examples, objective, 0, tmp_path / "cut" / "run",
                            trunk=scorer.trunk_lookup(), teacher=teacher,
                            checkpoints=(2,), on_checkpoint=lambda step, m: seen.append(
                                (step, len(m.get_decoder().layers), type(m.get_decoder().embed_tokens).__name__)))
    if teacher is not None:
        assert cut_run["teacher_cache"]["on_trunk"] and not full_run["teacher_cache"]["on_trunk"]
        assert len(teacher.get_decoder().layers) == 2
    assert [h["step"] for h in cut_run["history"]] == [1, 2, 3]
    for a, b in zip(full_run["history"], cut_run["history"]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-5)
    for (name, p), (_, q) in zip(full.named_parameters(), cut.named_parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=name)
    # the checkpoint saw the whole model; afterwards both the student and the base are whole again
    assert seen == [(2, 2, "Embedding")]
    for m in (cut, base):
        assert len(m.get_decoder().layers) == 2 and isinstance(m.get_decoder().embed_tokens, torch.nn.Embedding)


def test_trunk_lookup_matches_the_embedding_path_and_names_an_unknown_row(setup):
    settings, base, tok, examples, scorer = setup
    lookup = scorer.trunk_lookup()
    # padded batch of two known sequences through the top layer only == the full model
    rows = examples[:2]
    width = max(len(r["input_ids"]) for r in rows) + 3
    ids = torch.full((2, width), tok.pad_token_id)
    mask = torch.zeros((2, width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r["input_ids"])] = torch.tensor(r["input_ids"])
        mask[i, :len(r["input_ids"])] = 1
    with torch.no_grad():
        want = base(input_ids=ids, attention_mask=mask).logits
        with TopOnly(base, lookup, 1):
            got = base(input_ids=ids, attention_mask=mask).logits
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        torch.testing.assert_close(got[i, :n], want[i, :n], rtol=1e-4, atol=1e-4)
    with pytest.raises(KeyError, match="none of the sequences"):
        lookup(torch.tensor([[1, 2, 3]]))
    with pytest.raises(ValueError, match="hidden states for"):
        TrunkLookup([[1, 2]], [torch.zeros(3, 4)], 0)


def test_bottom_states_match_the_hidden_states_a_full_forward_feeds_the_split_layer(setup):
    settings, base, tok, examples, scorer = setup
    seqs = [e["input_ids"] for e in examples]
    got = bottom_states(base, seqs, 1, pad_token_id=tok.pad_token_id, batch_size=3)
    want = scorer.trunk_lookup()
    for ids in seqs:
        # reference: an unpadded full forward of the one sequence, the input of decoder layer 1 kept by a hook
        kept = []
        hook = base.get_decoder().layers[1].register_forward_pre_hook(
            lambda _m, args, kwargs: kept.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
        try:
            with torch.no_grad():
                base(input_ids=torch.tensor([ids]))
        finally:
            hook.remove()
        torch.testing.assert_close(got.lookup(ids), kept[0][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.lookup(ids), want.lookup(ids), rtol=1e-5, atol=1e-5)
    # the model is whole again, and a split outside the layers is named
    assert len(base.get_decoder().layers) == 2 and not isinstance(base.get_decoder().norm, torch.nn.Identity)
    with pytest.raises(ValueError, match="split 2 must be inside"):
        bottom_states(base, seqs, 2, pad_token_id=tok.pad_token_id)
