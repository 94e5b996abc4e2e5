"""The compact encoding of a teacher cache (format version 2): about a third of float32's bytes.

A shard's supervised tokens are cut into blocks of consecutive rows holding at least `block_tokens`
tokens each (the last may hold fewer); each block is one zlib stream, so reading a row inflates its
block only. Within a block of m tokens with k entries each, the stream holds, in this order:

    positions    m       int32 as 4 byte planes: the first token's position, then differences
    log_tail     m       float32 as 4 byte planes (stored exactly: the tail rules read it)
    id gaps      m x k   the token's k ids sorted ascending, as gaps id_j - id_{j-1} - 1 (id_{-1} = -1),
                         in `id_bytes` byte planes (2 when V <= 65536, 3 when V <= 2^24, else 4)
    codes        m x k   uint16 as 2 byte planes, in the same (ascending id) order:
                         c = round(C * (1 - sqrt(pi / pi_max))), C = 2^code_bits; c = C only for pi = 0

Byte planes (all high bytes, then all low bytes) and sorted ids give zlib long runs and repeats:
neighbouring tokens share most of their top-k. The log-probs are not stored: they are rebuilt from
the codes and the tail, pi_i = (1 - t) w_i / sum_j w_j with w_i = (1 - c_i / C)^2, so the top-k mass
plus the tail is exactly 1 and the row's top log-prob needs no storage. A code step is uniform in
sqrt(pi / pi_max): the error of pi_i is about 2 sqrt(pi_i pi_max) / C, largest on the tokens that
carry the mass; the error of the geometric mix p^(1-eta) pi^eta that Target-SFT forms is then about
even across the top-k. docs/teacher_cache.md ("Encoding") gives the measured loss and gradient error.
Decoded rows are sorted by probability, descending (ties: ascending id), like a float32 cache.
"""
from __future__ import annotations

import zlib

import numpy as np
import torch
from torch import Tensor

NAME = "compact"
CODE_BITS = 11
BLOCK_TOKENS = 1024
ZLIB_LEVEL = 9


def spec(vocab_size: int) -> dict:
    """The encoding's parameters, as recorded in the manifest and in every shard's header."""
    return {"name": NAME, "code_bits": CODE_BITS, "codec": f"zlib-{ZLIB_LEVEL}", "block_tokens": BLOCK_TOKENS,
            "id_bytes": id_bytes(vocab_size),
            "logprobs": "c = round(2^code_bits * (1 - sqrt(pi / pi_max))) in ascending id order; "
                        "pi = (1 - tail) w / sum w, w = (1 - c / 2^code_bits)^2"}


def id_bytes(vocab_size: int) -> int:
    return 2 if vocab_size <= 1 << 16 else 3 if vocab_size <= 1 << 24 else 4


def _planes(values: np.ndarray, n_bytes: int) -> bytes:
    """Little-endian integers -> their byte planes, most significant first."""
    v = np.ascontiguousarray(values.reshape(-1).astype(np.uint32)).view(np.uint8).reshape(-1, 4)
    return np.ascontiguousarray(v[:, :n_bytes][:, ::-1].T).tobytes()


def _unplanes(buf: memoryview | bytes, count: int, n_bytes: int) -> np.ndarray:
    """Inverse of `_planes`: `count` uint32 values from n_bytes planes."""
    planes = np.frombuffer(buf, dtype=np.uint8, count=count * n_bytes).reshape(n_bytes, count)
    out = np.zeros((count, 4), dtype=np.uint8)
    out[:, :n_bytes] = planes[::-1].T
    return out.view(np.uint32).reshape(count)


def logprob_codes(logprobs: Tensor, code_bits: int = CODE_BITS) -> Tensor:
    """[m, k] codes (int64) of log-probs: round(C (1 - sqrt(pi / pi_max))), C = 2^code_bits; C only
    where pi = 0 (log-prob -inf), finite log-probs clamped to C - 1."""
    C = 1 << code_bits
    lp = logprobs.to(torch.float64)
    top = lp.amax(-1, keepdim=True)
    ratio = torch.exp((lp - top) / 2)  # sqrt(pi / pi_max) in [0, 1]
    codes = torch.round(C * (1 - ratio)).to(torch.int64).clamp_(0, C - 1)
    return torch.where(torch.isneginf(lp), C, codes)


def logprobs_from_codes(codes: Tensor, log_tail: Tensor, code_bits: int = CODE_BITS) -> Tensor:
    """[m, k] float32 log-probs from codes [m, k] and log_tail [m]: pi = (1 - t) w / sum w, w = (1 - c / C)^2."""
    C = 1 << code_bits
    w = (1 - codes.to(torch.float64) / C).square_()
    log_mass = torch.log(-torch.expm1(log_tail.to(torch.float64)))  # log(1 - t)
    lp = torch.log(w) - torch.log(w.sum(-1, keepdim=True)) + log_mass.unsqueeze(-1)
    return lp.to(torch.float32)


def check_encodable(ids: Tensor, logprobs: Tensor, log_tail: Tensor, vocab_size: int) -> None:
    """What the encoding needs of its input, with the first offending token named (a producer bug)."""
    m, k = ids.shape
    if m == 0:
        return
    bad = (ids < 0) | (ids >= vocab_size)
    if bool(bad.any()):
        t = int(bad.any(-1).nonzero()[0])
        raise ValueError(f"compact encoding: token {t} of the shard holds id {int(ids[t][bad[t]][0])} outside "
                         f"[0, {vocab_size})")
    s = ids.sort(-1).values
    dup = (s[:, 1:] == s[:, :-1]).any(-1) if k > 1 else torch.zeros(m, dtype=torch.bool)
    if bool(dup.any()):
        raise ValueError(f"compact encoding: token {int(dup.nonzero()[0])} of the shard repeats a token id")
    top = logprobs.amax(-1)
    bad = ~torch.isfinite(top) | torch.isnan(logprobs).any(-1) | torch.isnan(log_tail) | (log_tail > 0)
    if bool(bad.any()):
        raise ValueError(f"compact encoding: token {int(bad.nonzero()[0])} of the shard has no finite top log-prob, "
                         f"a NaN, or a log_tail > 0")


def encode_block(positions: Tensor, ids: Tensor, logprobs: Tensor, log_tail: Tensor, vocab_size: int) -> bytes:
    """One block's zlib stream (see the module docstring). positions [m], ids/logprobs [m, k], log_tail [m]."""
    m, k = ids.shape
    pos = positions.to(torch.int64).numpy()
    dpos = np.diff(pos, prepend=0) if m else pos
    order = ids.argsort(dim=-1, stable=True)
    sorted_ids = ids.gather(-1, order).numpy().astype(np.int64)
    gaps = np.diff(sorted_ids, axis=-1, prepend=-1) - 1
    codes = logprob_codes(logprobs).gather(-1, order).numpy()
    tail = np.ascontiguousarray(log_tail.to(torch.float32).numpy()).view(np.uint32)
    payload = b"".join((_planes(dpos.astype(np.int64) & 0xFFFFFFFF, 4), _planes(tail, 4),
                        _planes(gaps, id_bytes(vocab_size)), _planes(codes, 2)))
    return zlib.compress(payload, ZLIB_LEVEL)


def decode_block(blob: bytes, m: int, k: int, vocab_size: int, code_bits: int = CODE_BITS
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Inverse of `encode_block`: positions [m] int64, ids [m, k] int64, logprobs [m, k] float32 (sorted
    descending, ties by id), log_tail [m] float32. Raises ValueError if the stream is not m x k tokens."""
    nb = id_bytes(vocab_size)
    try:
        raw = zlib.decompress(blob)
    except zlib.error as e:
        raise ValueError(f"the block's zlib stream is damaged ({e})") from None
    expected = m * 8 + m * k * (nb + 2)
    if len(raw) != expected:
        raise ValueError(f"the block holds {len(raw)} bytes, expected {expected} for {m} tokens of k = {k}")
    buf = memoryview(raw)
    dpos = _unplanes(buf[:4 * m], m, 4).view(np.int32).astype(np.int64)
    tail = _unplanes(buf[4 * m:8 * m], m, 4).view(np.float32)
    o = 8 * m
    gaps = _unplanes(buf[o:o + nb * m * k], m * k, nb).astype(np.int64).reshape(m, k)
    o += nb * m * k
    codes = _unplanes(buf[o:o + 2 * m * k], m * k, 2).astype(np.int64).reshape(m, k)
    positions = torch.from_numpy(np.cumsum(dpos))
    ids = torch.from_numpy(np.cumsum(gaps + 1, axis=-1) - 1)
    log_tail = torch.from_numpy(tail.copy())
    codes_t = torch.from_numpy(codes)
    logprobs = logprobs_from_codes(codes_t, log_tail, code_bits)
    order = codes_t.argsort(dim=-1, stable=True)  # ascending code = descending probability; ties keep id order
    return positions, ids.gather(-1, order), logprobs.gather(-1, order), log_tail


def blocks(row_offsets: Tensor, block_tokens: int = BLOCK_TOKENS) -> list[int]:
    """Row boundaries [0, ..., R] of blocks of consecutive rows holding >= block_tokens tokens each
    (the last block may hold fewer; a block holds at least one row)."""
    off = row_offsets.tolist()
    R = len(off) - 1
    cuts, start = [0], 0
    for r in range(1, R + 1):
        if off[r] - off[start] >= block_tokens or r == R:
            cuts.append(r)
            start = r
    return cuts if R else [0]

