"""Reading a teacher cache: open and validate it, check it fits a training run, fetch rows.

    cache = TeacherCache(DIR)                        # manifest + every shard's header and index
    cache.check_rows("train", examples)              # same rows (count, per-row fingerprints) or an error naming the row
    cache.row("train", 17) -> CachedRow              # positions [m], TeacherTopK ([m, k], [m])
    cache.batch(["train"] * B, rows, labels) -> dict # teacher_topk_ids / _logprobs / _log_tail aligned with labels
"""
from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import safe_open
from torch import Tensor

from qtarget.ops.sparse_teacher import TeacherTopK, check_teacher_topk
from qtarget.teacher_cache.manifest import Manifest, describe
from qtarget.teacher_cache.schema import row_fingerprint, supervised_positions, tokenizer_fingerprint
from qtarget.teacher_cache.storage import CorruptShardError, ShardIndex, open_shard, read_block, shard_path, verify_shard

BATCH_KEYS = ("teacher_topk_ids", "teacher_topk_logprobs", "teacher_topk_log_tail")
FILLER_LOG_TAIL_GAP = 50.0  # filler at unsupervised positions: uniform over k ids, tail e^-50 of that
DECODED_BLOCKS = 8  # compact shards: decoded blocks kept per reader (a block is >= 1024 tokens of rows)


class MissingRowError(KeyError, ValueError):
    """A row, split or shard the cache does not hold (a ValueError too: bad input, one line on the CLI)."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0])


@dataclass
class CachedRow:
    positions: Tensor  # [m] int64, position t in the row (pi_T of labels[t])
    topk: TeacherTopK  # ids [m, k] int64, logprobs [m, k] float32, log_tail [m] float32


class TeacherCache:
    """A teacher cache folder (see schema.py). Opening reads the manifest and every shard's header and
    index (a shard that is absent is an error naming its rows; so is one that is unreadable or built
    for another manifest). With verify=True (default) each shard's sha256 is checked the first time
    a row of it is read, so a training run reads every shard whole once, spread over the run;
    `verify_all()` checks them all now."""

    def __init__(self, folder: str | Path, *, verify: bool = True) -> None:
        self.folder = Path(folder)
        self.manifest = Manifest.load(self.folder)
        self.verify = verify
        self._digest = self.manifest.digest()
        self._index: dict[str, list[ShardIndex]] = {}
        self._verified: set[Path] = set()
        self._handles: dict[Path, Any] = {}
        self._blocks: OrderedDict[tuple[Path, int], tuple[Tensor, ...]] = OrderedDict()
        R = self.manifest.rows_per_shard
        missing = []
        for split, info in self.manifest.splits.items():
            shards = []
            for shard in range(math.ceil(info.rows / R)):
                path = shard_path(self.folder, split, shard)
                if not path.is_file():
                    missing.append(f"{split} rows {shard * R}-{min(info.rows, (shard + 1) * R) - 1} ({path.name})")
                    continue
                ix = open_shard(path, split=split, shard=shard, manifest_digest=self._digest)
                n_expected = min(info.rows, (shard + 1) * R) - shard * R
                expected_rows = torch.arange(shard * R, shard * R + n_expected)
                if ix.row_index.numel() != n_expected or not torch.equal(ix.row_index, expected_rows):
                    raise CorruptShardError(f"teacher cache shard {path} holds rows {ix.row_index.tolist()[:3]}..., "
                                            f"expected the {n_expected} rows from {shard * R}")
                if ix.version != self.manifest.version:
                    raise CorruptShardError(f"teacher cache shard {path} has format version {ix.version}, the "
                                            f"manifest says {self.manifest.version}")
                if ix.k != self.manifest.top_k:
                    raise CorruptShardError(f"teacher cache shard {path} has k = {ix.k} ids per "
                                            f"token, the manifest says top_k = {self.manifest.top_k}")
                shards.append(ix)
            self._index[split] = shards
        if missing:
            raise MissingRowError(f"teacher cache {self.folder} is incomplete: missing {'; '.join(missing)}. "
                                  f"Re-run `qtarget teacher-cache` with the same arguments to finish it")

    def describe(self) -> str:
        m = self.manifest
        splits = ", ".join(f"{name} {s.rows} rows / {s.supervised_tokens} tokens" for name, s in m.splits.items())
        return (f"teacher cache {self.folder}: teacher {m.teacher.get('name')!r} (weights {m.teacher.get('weights')}), "
                f"top-{m.top_k} at temperature {m.temperature:g} ({m.logprob_dtype} log-probs), {splits}")

    # ------------------------------------------------------------------ checks against a run
    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.manifest.splits)

    def _split(self, split: str) -> list[ShardIndex]:
        if split not in self._index:
            raise MissingRowError(f"teacher cache {self.folder} has no {split!r} split (it has: {', '.join(self._index)})")
        return self._index[split]

    def fingerprints(self, split: str) -> Tensor:
        return torch.cat([s.row_fingerprint for s in self._split(split)])

    def check_rows(self, split: str, examples: Sequence[Mapping[str, Any]], settings: Mapping[str, Any] | None = None) -> None:
        """The tokenised `examples` are exactly the cached rows of `split`; else a ValueError naming the
        first differing row and, when `settings` (tokenisation keys) are given, the keys that differ."""
        cached = self.fingerprints(split)
        mine = torch.tensor([row_fingerprint(ex) for ex in examples], dtype=torch.int64)
        why = ""
        if settings is not None:
            diff = [(k, v, settings.get(k)) for k, v in sorted(self.manifest.settings.items())
                    if k in settings and settings.get(k) != v]
            if diff:
                why = f" Tokenisation settings that differ: {describe(diff, 'cache', 'this run')}."
        if len(mine) != len(cached):
            raise ValueError(f"teacher cache {self.folder} was built for other data: its {split!r} split has "
                             f"{len(cached)} rows, this run has {len(mine)}.{why}")
        bad = (mine != cached).nonzero()
        if len(bad):
            i = int(bad[0])
            raise ValueError(f"teacher cache {self.folder} was built for other data: row {i} of the {split!r} split "
                             f"differs (input_ids/labels fingerprint {int(mine[i])} vs cached {int(cached[i])}; "
                             f"{len(bad)} of {len(mine)} rows differ).{why}")

    def check_tokenizer(self, tokenizer) -> None:
        fp = tokenizer_fingerprint(tokenizer)
        if fp != self.manifest.tokenizer_fingerprint:
            raise ValueError(f"teacher cache {self.folder} was built with another tokenizer (tokenizer_fingerprint: "
                             f"cache has {self.manifest.tokenizer_fingerprint!r}, this run {fp!r})")

    def check_vocab_size(self, vocab_size: int) -> None:
        if int(vocab_size) != self.manifest.vocab_size:
            raise ValueError(f"teacher cache {self.folder} covers a vocabulary of {self.manifest.vocab_size} tokens "
                             f"(vocab_size) but the student's LM head has {vocab_size} rows: rebuild it with the "
                             f"student as --model")

    # ------------------------------------------------------------------ reading
    def verify_all(self) -> None:
        """Check every shard's sha256 now (reads the whole cache)."""
        for shards in self._index.values():
            for ix in shards:
                self._verify(ix)

    def _verify(self, ix: ShardIndex) -> None:
        if ix.path not in self._verified:
            verify_shard(ix)
            self._verified.add(ix.path)

    def _handle(self, path: Path):
        if path not in self._handles:
            self._handles[path] = safe_open(str(path), framework="pt")
        return self._handles[path]

    def __getstate__(self) -> dict:  # DataLoader workers reopen the files
        state = dict(self.__dict__)
        state["_handles"] = {}
        state["_blocks"] = OrderedDict()
        return state

    def _tokens(self, s: ShardIndex, local: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """positions, ids, logprobs, log_tail of the shard's row `local` (any format version)."""
        a, b = int(s.row_offsets[local]), int(s.row_offsets[local + 1])
        f = self._handle(s.path)
        if s.version == 1:
            return (f.get_slice("positions")[a:b].to(torch.int64), f.get_slice("ids")[a:b].to(torch.int64),
                    f.get_slice("logprobs")[a:b].to(torch.float32), f.get_slice("log_tail")[a:b].to(torch.float32))
        block = int(torch.searchsorted(s.block_rows, torch.tensor(local), right=True)) - 1
        key = (s.path, block)
        if key not in self._blocks:
            self._blocks[key] = read_block(f, s, block, self.manifest.encoding)
            if len(self._blocks) > DECODED_BLOCKS:
                self._blocks.popitem(last=False)
        self._blocks.move_to_end(key)
        start = int(s.row_offsets[int(s.block_rows[block])])
        return tuple(t[a - start:b - start].clone() for t in self._blocks[key])

    def row(self, split: str, index: int) -> CachedRow:
        """The cached top-k of one row, values checked (ids in [0, V), distinct, log-probs valid)."""
        shards = self._split(split)
        n_rows = self.manifest.splits[split].rows
        if not 0 <= int(index) < n_rows:
            raise MissingRowError(f"teacher cache {self.folder} has no row {index} in its {split!r} split "
                                  f"(it holds rows 0-{n_rows - 1})")
        s = shards[int(index) // self.manifest.rows_per_shard]
        if self.verify:
            self._verify(s)
        local = int(index) - int(s.row_index[0])
        positions, ids, logprobs, log_tail = self._tokens(s, local)
        topk = TeacherTopK(ids=ids, logprobs=logprobs, log_tail=log_tail)
        try:
            check_teacher_topk(topk, (len(positions),), self.manifest.vocab_size, tail="renormalize")
        except ValueError as e:
            raise ValueError(f"teacher cache row {index} of the {split!r} split ({s.path}): {e} "
                             f"(position = index among the row's supervised tokens)") from None
        return CachedRow(positions=positions, topk=topk)

    def batch(self, splits: Sequence[str], rows: Sequence[int], labels: Tensor) -> dict[str, Tensor]:
        """Batch tensors aligned with `labels` [B, T] (unshifted: position t holds pi_T of labels[t]):
        teacher_topk_ids [B, T, k] int64, teacher_topk_logprobs [B, T, k] float32, teacher_topk_log_tail
        [B, T] float32. Unsupervised positions hold a finite, valid filler (uniform over ids 0..k-1).
        Raises if a row's cached positions are not its supervised positions."""
        B, T = labels.shape
        k = self.manifest.top_k
        ids = torch.arange(k, dtype=torch.int64).expand(B, T, k).clone()
        logprobs = torch.full((B, T, k), -math.log(k), dtype=torch.float32)
        log_tail = torch.full((B, T), -math.log(k) - FILLER_LOG_TAIL_GAP, dtype=torch.float32)
        for b, (split, index) in enumerate(zip(splits, rows)):
            cached = self.row(split, int(index))
            expected = supervised_positions(labels[b].tolist())
            if cached.positions.tolist() != expected:
                raise ValueError(f"teacher cache row {index} of the {split!r} split holds {len(cached.positions)} "
                                 f"supervised positions that do not match the batch row's {len(expected)}: the "
                                 f"cache was built for other data")
            pos = cached.positions
            ids[b, pos] = cached.topk.ids
            logprobs[b, pos] = cached.topk.logprobs
            log_tail[b, pos] = cached.topk.log_tail
        return dict(zip(BATCH_KEYS, (ids, logprobs, log_tail)))
