"""The teacher as a Hugging Face model in this process (the default engine): batched forwards over
collated rows, logits formed chunk by chunk at the supervised positions only (never [B, T, V])."""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import transformers
from torch import Tensor, nn

from qtarget.data.collate import Collator
from qtarget.ops.sparse_teacher import TeacherTopK, topk_from_logits
from qtarget.teacher_cache.engines.base import Engine, Progress, PromptTopK, TopKRows
from qtarget.teacher_cache.manifest import teacher_identity
from qtarget.teacher_cache.schema import IGNORE_INDEX
from qtarget.training.patch import aux_hidden_and_head

LOGITS_BYTES = 1 << 28  # float32 teacher logits formed at once: 256 MiB


@torch.no_grad()
def teacher_topk_rows(teacher: nn.Module, batch: dict[str, Tensor], *, top_k: int, temperature: float,
                      vocab_size: int) -> tuple[Tensor, TeacherTopK]:
    """The teacher's top-k at the supervised positions of one collated batch, in row-major order:
    (positions [n, 2] = (row, t) with labels[row, t] != -100, t >= 1;  TeacherTopK with [n, k], [n])."""
    hidden, head = aux_hidden_and_head(teacher, batch, vocab_size)  # [B, T, H]; rows past the student's V dropped
    mask = batch["labels"][:, 1:] != IGNORE_INDEX
    where = mask.nonzero()
    where[:, 1] += 1
    h = hidden[:, :-1][mask]  # [n, H]: the prefix up to t - 1 predicts labels[t]
    chunk = max(1, LOGITS_BYTES // (4 * vocab_size))
    parts = [topk_from_logits(head.logits(h[i:i + chunk]), top_k, temperature)
             for i in range(0, h.shape[0], chunk)]
    if not parts:
        empty = torch.empty(0, top_k, device=h.device)
        return where, TeacherTopK(empty.long(), empty, empty[:, 0])
    return where, TeacherTopK(torch.cat([p.ids for p in parts]), torch.cat([p.logprobs for p in parts]),
                              torch.cat([p.log_tail for p in parts]))


class HFEngine(Engine):
    """A loaded `nn.Module` causal LM (any device); rows go through it `batch_size` at a time."""

    name = "hf"

    def __init__(self, teacher: nn.Module, tokenizer, *, batch_size: int = 8, teacher_name: str | None = None,
                 vocab_size: int | None = None):
        self.teacher, self.tokenizer, self.batch_size, self.teacher_name = teacher, tokenizer, int(batch_size), teacher_name
        self.vocab_size = int(vocab_size or len(tokenizer))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.collator = Collator(pad)
        self._was_training = teacher.training

    def open(self) -> None:
        self._was_training = self.teacher.training
        self.teacher.eval()

    def close(self) -> None:
        self.teacher.train(self._was_training)

    def identity(self) -> dict[str, Any]:
        return teacher_identity(self.teacher, self.teacher_name)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "version": transformers.__version__, "settings": {"batch_size": self.batch_size}}

    def tokenize(self, text: str, add_special_tokens: bool) -> list[int] | None:
        return None  # the teacher's tokenizer is the caller's to check (`check_same_vocabulary`)

    @property
    def device(self):
        return next(self.teacher.parameters()).device

    def topk_rows(self, rows: Sequence[Mapping[str, Any]], *, top_k: int, temperature: float, vocab_size: int,
                  progress: Progress | None = None, where: Callable[[int], str] = lambda i: f"row {i}") -> TopKRows:
        counts, positions, ids, logprobs, log_tail = [], [], [], [], []
        for b0 in range(0, len(rows), self.batch_size):
            chunk = rows[b0:b0 + self.batch_size]
            batch = {k: v.to(self.device) for k, v in self.collator(chunk).items()}
            at, topk = teacher_topk_rows(self.teacher, batch, top_k=top_k, temperature=temperature,
                                         vocab_size=vocab_size)
            at = at.cpu()
            counts += torch.bincount(at[:, 0], minlength=len(chunk)).tolist()
            positions.append(at[:, 1])
            ids.append(topk.ids.cpu())
            logprobs.append(topk.logprobs.cpu())
            log_tail.append(topk.log_tail.cpu())
            if progress is not None:
                progress(sum(len(r["input_ids"]) for r in chunk))
        return TopKRows(counts, torch.cat(positions), torch.cat(ids), torch.cat(logprobs), torch.cat(log_tail))

    def prompt_topk(self, prompts: Sequence[Sequence[int]], top_k: int, progress: Progress | None = None
                    ) -> list[PromptTopK]:
        """The same question in the servers' form (every position of each prompt), for the preflight."""
        out = []
        for ids in prompts:
            row = {"input_ids": list(ids), "labels": [IGNORE_INDEX] + list(ids[1:])}
            got = self.topk_rows([row], top_k=top_k, temperature=1.0, vocab_size=self.vocab_size, progress=progress)
            entries: list = [None] * len(ids)
            for t, i_row, l_row in zip(got.positions.tolist(), got.ids.tolist(), got.logprobs.tolist()):
                entries[t] = [(i, lp, r + 1) for r, (i, lp) in enumerate(zip(i_row, l_row))]
            out.append(PromptTopK(list(ids), entries))
        return out
