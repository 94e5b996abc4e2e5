"""The compact encoding of the teacher cache (format version 2): codes and decoding against float64
formulas written here, the block round trip, Target-SFT's loss and gradients from a compact cache
against the float32 cache's, bytes per token, version-1 caches, the manifest, and bad input."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from qtarget.data import Collator, prepare_data
from qtarget.data.collate import CacheRows
from qtarget.models import tiny_causal_lm
from qtarget.objectives import get_objective
from qtarget.ops import fused_token_loss
from qtarget.ops.sparse_teacher import TeacherTopK, topk_from_logits
from qtarget.teacher_cache import CorruptShardError, Manifest, TeacherCache, build_cache
from qtarget.teacher_cache import encoding as compact
from qtarget.teacher_cache import reader as reader_module
from qtarget.teacher_cache.schema import TENSORS, TENSORS_V2, tensors_sha256
from qtarget.teacher_cache.storage import META_KEY, write_shard
from test_train_support import tokenizer, toy_rows

C = 1 << compact.CODE_BITS


def random_topk(m: int, k: int, V: int, seed: int = 0, spread: float = 3.0) -> TeacherTopK:
    g = torch.Generator().manual_seed(seed)
    return topk_from_logits(torch.randn(m, V, generator=g) * spread, k)


def ref_codes(logprobs: np.ndarray) -> np.ndarray:
    """float64 reference: c = round(C (1 - sqrt(pi / pi_max))), C for pi = 0, else at most C - 1."""
    p = np.exp(logprobs.astype(np.float64))
    ratio = np.sqrt(p / p.max(-1, keepdims=True))
    c = np.minimum(np.rint(C * (1 - ratio)), C - 1)
    return np.where(p == 0, C, c).astype(np.int64)


def ref_decode(codes: np.ndarray, log_tail: np.ndarray) -> np.ndarray:
    """float64 reference: pi = (1 - t) w / sum w, w = (1 - c / C)^2; returns log pi."""
    w = (1 - codes / C) ** 2
    pi = (1 - np.exp(log_tail.astype(np.float64)))[:, None] * w / w.sum(-1, keepdims=True)
    with np.errstate(divide="ignore"):
        return np.log(pi)


# ----------------------------------------------------------------------------- the codec
@pytest.mark.parametrize("V,k", [(1000, 16), (70000, 8), (50, 1)])
def test_block_round_trip_against_float64_formulas(V, k):
    m = 37
    topk = random_topk(m, k, V, seed=V + k)
    positions = torch.cat([torch.arange(1, 21), torch.arange(3, 20)])  # two rows: positions restart
    blob = compact.encode_block(positions, topk.ids, topk.logprobs, topk.log_tail, V)
    pos, ids, logprobs, log_tail = compact.decode_block(blob, m, k, V)
    assert torch.equal(pos, positions.long())
    assert torch.equal(log_tail.view(torch.int32), topk.log_tail.view(torch.int32))  # the tail: bit for bit
    assert torch.equal(ids.sort(-1).values, topk.ids.sort(-1).values)
    assert bool((logprobs[:, 1:] <= logprobs[:, :-1]).all())  # sorted by probability, like a float32 cache
    # the codes of the stored log-probs, and their decoding, per id
    codes = ref_codes(topk.logprobs.numpy())
    expected = ref_decode(codes, topk.log_tail.numpy())
    for t in range(m):
        want = dict(zip(topk.ids[t].tolist(), expected[t].tolist()))
        got = dict(zip(ids[t].tolist(), logprobs[t].tolist()))
        assert got.keys() == want.keys()
        assert max(abs(got[i] - want[i]) for i in got) < 1e-5
    assert torch.equal(compact.logprob_codes(topk.logprobs), torch.from_numpy(codes))


def test_quantisation_error_is_half_a_code_step_in_sqrt_ratio_and_the_mass_is_exact():
    topk = random_topk(200, 64, 5000, seed=3, spread=4.0)
    blob = compact.encode_block(torch.arange(1, 201), topk.ids, topk.logprobs, topk.log_tail, 5000)
    _, ids, logprobs, log_tail = compact.decode_block(blob, 200, 64, 5000)
    order_in, order_out = topk.ids.argsort(-1), ids.argsort(-1)
    lp_true = topk.logprobs.double().gather(-1, order_in)
    lp_got = logprobs.double().gather(-1, order_out)
    r_true = torch.exp((lp_true - lp_true.amax(-1, keepdim=True)) / 2)
    r_got = torch.exp((lp_got - lp_got.amax(-1, keepdim=True)) / 2)
    assert float((r_got - r_true).abs().max()) <= 0.5 / C + 1e-6
    mass = logprobs.double().exp().sum(-1) + log_tail.double().exp()
    assert float((mass - 1).abs().max()) < 1e-6


def test_zero_probability_entries_and_empty_blocks():
    lp = torch.tensor([[-0.5, -1.5, -math.inf], [-0.1, -30.0, -3.0]])
    log_tail = torch.log(1 - lp.exp().sum(-1))
    ids = torch.tensor([[5, 2, 9], [0, 1, 7]])
    blob = compact.encode_block(torch.tensor([1, 2]), ids, lp, log_tail, 10)
    _, ids2, lp2, _ = compact.decode_block(blob, 2, 3, 10)
    assert ids2[0].tolist() == [5, 2, 9] and lp2[0, 2] == -math.inf  # pi = 0 stays 0
    assert math.isfinite(float(lp2[1, 1]))  # 30 nats below the top: the last finite code, not 0
    empty = compact.encode_block(torch.zeros(0), torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, 3),
                                 torch.zeros(0), 10)
    assert [t.shape[0] for t in compact.decode_block(empty, 0, 3, 10)] == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="holds 0 bytes, expected"):
        compact.decode_block(empty, 1, 3, 10)
    with pytest.raises(ValueError, match="damaged"):
        compact.decode_block(b"not zlib", 1, 3, 10)


# ----------------------------------------------------------------------------- caches from a tiny model
@pytest.fixture(scope="module")
def data():
    return prepare_data(toy_rows(16), tokenizer(), max_length=64, seed=3)


def tiny_teacher(head_scale: float):
    """A random Llama; head_scale > 1 sharpens its distribution toward a trained model's."""
    model = tiny_causal_lm(tokenizer(), hidden_size=48, num_layers=1, num_heads=2, seed=7)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(head_scale)
    return model


def build(folder: Path, teacher, data, encoding: str, k: int = 64, **kw) -> Path:
    build_cache(teacher, tokenizer(), data.train, folder, top_k=k, rows_per_shard=6, batch_size=4, progress=False,
                logprob_dtype=encoding, **kw)
    return folder


def loss_and_grads(cache: TeacherCache, data, tail: str, eta: float, seed: int = 0):
    """Target-SFT through the fused engine on one batch read from `cache` (as training does): the loss
    and the gradients of the student's hidden states and LM-head weight."""
    batch = Collator(tokenizer().eos_token_id, teacher_cache=cache)([CacheRows(data.train)[i] for i in range(8)])
    g = torch.Generator().manual_seed(seed)
    B, T = batch["labels"].shape
    hidden = (torch.randn(B, T - 1, 32, generator=g, dtype=torch.float64) * 2).float().requires_grad_(True)
    head = (torch.randn(len(tokenizer()), 32, generator=g) * 0.3).requires_grad_(True)
    topk = TeacherTopK(batch["teacher_topk_ids"][:, 1:], batch["teacher_topk_logprobs"][:, 1:],
                       batch["teacher_topk_log_tail"][:, 1:])
    out = fused_token_loss(get_objective("target_sft", eta=eta), hidden, head, batch["labels"][:, 1:],
                           teacher_topk=topk, teacher_tail=tail)
    out.loss.backward()
    return float(out.loss.detach()), hidden.grad.double(), head.grad.double()


@pytest.mark.parametrize("head_scale", [1.0, 12.0])
def test_target_sft_from_the_compact_cache_within_1e3_of_float32(tmp_path, data, head_scale):
    teacher = tiny_teacher(head_scale)
    f32 = TeacherCache(build(tmp_path / "f32", teacher, data, "float32"))
    cmp = TeacherCache(build(tmp_path / "compact", teacher, data, "compact"))
    for tail, eta in (("student", 0.5), ("renormalize", 1.0), ("uniform", 0.5)):
        l32, h32, w32 = loss_and_grads(f32, data, tail, eta)
        lc, hc, wc = loss_and_grads(cmp, data, tail, eta)
        assert abs(lc - l32) <= 1e-3 * abs(l32), (tail, lc, l32)
        assert float((hc - h32).norm() / h32.norm()) <= 1e-3, tail
        assert float((wc - w32).norm() / w32.norm()) <= 1e-3, tail


def token_bytes(folder: Path) -> float:
    """Bytes of the per-token tensors (v1: positions, ids, logprobs, log_tail; v2: data) per supervised token."""
    total, tokens = 0, 0
    for path in folder.glob("*/shard-*.safetensors"):
        t = load_file(str(path))
        names = ("data",) if "data" in t else ("positions", "ids", "logprobs", "log_tail")
        total += sum(t[n].numel() * t[n].element_size() for n in names)
        tokens += int(t["row_offsets"][-1])
    return total / tokens


def test_bytes_per_token_and_the_manifest(tmp_path, data):
    teacher = tiny_teacher(12.0)
    sizes = {enc: token_bytes(build(tmp_path / enc, teacher, data, enc)) for enc in ("float32", "float16", "compact")}
    assert sizes["float32"] == 4 + 64 * (2 + 4) + 4 and sizes["float16"] == 4 + 64 * (2 + 2) + 4
    # a random teacher is the encoding's worst case: random ids over 50257 tokens cost ~11 bits each however
    # they are coded, and its codes spread evenly (a trained teacher's: test_smollm2_compact_cache_size)
    assert sizes["compact"] < 0.5 * sizes["float32"] and sizes["compact"] < 0.75 * sizes["float16"], sizes
    m = json.loads((tmp_path / "compact" / "manifest.json").read_text())
    assert m["version"] == 2 and m["logprob_dtype"] == "compact"
    assert m["encoding"]["name"] == "compact" and m["encoding"]["code_bits"] == compact.CODE_BITS
    assert m["encoding"]["id_bytes"] == 2  # GPT-2: 50257 ids
    m32 = json.loads((tmp_path / "float32" / "manifest.json").read_text())
    assert m32["version"] == 1 and "encoding" not in m32  # version 1: exactly the old manifest keys
    with safe_open(str(tmp_path / "float32" / "train" / "shard-000000.safetensors"), "pt") as f:
        assert set(f.keys()) == set(TENSORS) and json.loads(f.metadata()[META_KEY])["version"] == "1"
    with safe_open(str(tmp_path / "compact" / "train" / "shard-000000.safetensors"), "pt") as f:
        assert set(f.keys()) == set(TENSORS_V2) and json.loads(f.metadata()[META_KEY])["version"] == "2"


def test_default_is_compact_and_rows_match_float32(tmp_path, data):
    teacher = tiny_teacher(12.0)
    build_cache(teacher, tokenizer(), data.train, tmp_path / "default", top_k=16, rows_per_shard=6, batch_size=4,
                progress=False)  # batches as build()'s: the same float32 teacher outputs
    cmp, f32 = TeacherCache(tmp_path / "default"), TeacherCache(build(tmp_path / "f32", teacher, data, "float32", k=16))
    assert cmp.manifest.logprob_dtype == "compact" and cmp.manifest.version == 2
    cmp.verify_all()
    for i in range(len(data.train)):
        a, b = f32.row("train", i), cmp.row("train", i)
        assert torch.equal(a.positions, b.positions) and torch.equal(a.topk.log_tail, b.topk.log_tail)
        sa, sb = a.topk.ids.sort(-1), b.topk.ids.sort(-1)
        assert torch.equal(sa.values, sb.values)
        pa, pb = a.topk.logprobs.gather(-1, sa.indices).exp(), b.topk.logprobs.gather(-1, sb.indices).exp()
        # |d pi| <= 2 sqrt(pi pi_max) / (2 C) + the renormalisation's share: well under 2 / C
        assert float((pa - pb).abs().max()) < 2 / C


def test_several_blocks_per_shard_read_in_any_order(tmp_path, data, monkeypatch):
    monkeypatch.setattr(compact, "BLOCK_TOKENS", 20)  # blocks of a few rows
    monkeypatch.setattr(reader_module, "DECODED_BLOCKS", 2)
    teacher = tiny_teacher(12.0)
    folder = build(tmp_path / "c", teacher, data, "compact", k=8)
    assert TeacherCache(folder).manifest.encoding["block_tokens"] == 20
    with safe_open(str(folder / "train" / "shard-000000.safetensors"), "pt") as f:
        assert f.get_tensor("block_rows").numel() > 2
    in_order = [TeacherCache(folder).row("train", i) for i in range(len(data.train))]
    cache = TeacherCache(folder)
    for i in torch.randperm(len(data.train), generator=torch.Generator().manual_seed(0)).tolist() * 2:
        r = cache.row("train", i)
        assert torch.equal(r.topk.ids, in_order[i].topk.ids) and torch.equal(r.topk.logprobs, in_order[i].topk.logprobs)
        assert torch.equal(r.positions, in_order[i].positions)


# ----------------------------------------------------------------------------- refusals
def test_a_damaged_block_is_named(tmp_path, data):
    folder = build(tmp_path / "c", tiny_teacher(1.0), data, "compact", k=8)
    path = folder / "train" / "shard-000001.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()[META_KEY])
    tensors = dict(load_file(str(path)))
    tensors["data"] = tensors["data"].clone()
    tensors["data"][len(tensors["data"]) // 2] ^= 0xFF
    meta["sha256"] = tensors_sha256(tensors)  # re-signed: a producer bug, not bit rot
    save_file(tensors, str(path), metadata={META_KEY: json.dumps(meta)})
    cache = TeacherCache(folder)
    cache.row("train", 0)
    with pytest.raises(CorruptShardError, match=r"shard-000001.safetensors: block 0 \(rows 0-5\) does not decode"):
        cache.row("train", 6)


def test_manifest_version_must_fit_the_encoding(tmp_path, data):
    folder = build(tmp_path / "c", tiny_teacher(1.0), data, "compact", k=8)
    m = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**m, "version": 1}))
    with pytest.raises(ValueError, match=r"logprob_dtype 'compact' is stored by format version 2, the manifest says "
                                         r"version 1"):
        TeacherCache(folder)
    (folder / "manifest.json").write_text(json.dumps({**m, "version": 3}))
    with pytest.raises(ValueError, match=r"format version 3 is not supported \(this qtarget reads versions 1, 2\)"):
        TeacherCache(folder)
    with pytest.raises(ValueError, match="logprob_dtype must be one of compact, float32, float16, bfloat16"):
        build_cache(tiny_teacher(1.0), tokenizer(), data.train, tmp_path / "x", top_k=8, logprob_dtype="int8",
                    progress=False)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("bad,message", [
    ("range", "token 3 of the shard holds id 70000 outside"),
    ("duplicate", "token 3 of the shard repeats a token id"),
    ("nan", "token 3 of the shard has no finite top log-prob, a NaN"),
])
def test_the_writer_refuses_what_it_cannot_encode(tmp_path, bad, message):
    V, k, m = 1000, 4, 6
    topk = random_topk(m, k, V)
    ids, logprobs = topk.ids.clone(), topk.logprobs.clone()
    if bad == "range":
        ids[3, 1] = 70000
    elif bad == "duplicate":
        ids[3, 1] = ids[3, 0]
    else:
        logprobs[3, 2] = math.nan
    manifest = Manifest(teacher={"name": "t", "revision": None, "weights": "w"}, tokenizer_fingerprint="f",
                        vocab_size=V, top_k=k, temperature=1.0, logprob_dtype="compact", rows_per_shard=2, splits={})
    tensors = {"row_index": torch.arange(2), "row_fingerprint": torch.zeros(2, dtype=torch.long),
               "row_offsets": torch.tensor([0, 3, 6]), "positions": torch.tensor([1, 2, 3, 1, 2, 3], dtype=torch.int32),
               "ids": ids, "logprobs": logprobs, "log_tail": topk.log_tail}
    with pytest.raises(ValueError, match=f"shard 0: compact encoding: {message}"):
        write_shard(tmp_path, "train", 0, tensors, manifest.digest(), encoding=manifest.encoding)
    assert not list(tmp_path.rglob("*.safetensors*"))


@pytest.mark.slow
def test_smollm2_compact_cache_is_at_most_150_bytes_per_token_at_k64(tmp_path):
    from qtarget.lab.tasks import demonstrations, shop_problems
    from qtarget.models import load_smollm2

    teacher, tok = load_smollm2()
    rows = [{"prompt": r["prompt"], "response": r["response"]}
            for r in demonstrations(shop_problems(8, seed=5), noise=0.0, seed=5)]
    data = prepare_data(rows, tok, max_length=256, chat_template=True)
    build_cache(teacher, tok, data.train, tmp_path, top_k=64, batch_size=8, progress=False)  # the default: compact
    n = TeacherCache(tmp_path).manifest.splits["train"].supervised_tokens
    size = sum(p.stat().st_size for p in tmp_path.glob("*/shard-*.safetensors")) / n  # whole files, headers included
    assert n > 150 and size <= 150, (n, size)
