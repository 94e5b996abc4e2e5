"""The frozen trunk, computed once: only the top layers of a lab model train, so the hidden states entering
the first trained layer are the same for the base model, every objective and every seed. The lab computes
them once per sequence with the base model (`qtarget.lab.metrics.Scorer` keeps them) and trains and scores
the top layers alone.

`TrunkLookup` stands in for the embedding layer: given the input_ids of a known sequence (right-padded, as
the library's collator pads) it returns that sequence's stored hidden states. `TopOnly(model, lookup, split)`
swaps it in and keeps only decoder layers split.. for the duration of a `with` block, so the library's own
trainer (and any reference model given the same view) runs the top layers only; leaving the block puts the
embeddings and every layer back. `bottom_states(model, sequences, split)` computes a trunk without scoring
anything (the target_sft teacher's demonstrations: the lab trains the teacher on its own trunk too).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class TrunkLookup(nn.Module):
    """input_ids [B, T] of known sequences -> their hidden states entering layer `split` [B, T, H]
    (zeros on padding). A row matches the stored sequence it starts with; causality makes the hidden states
    of a prefix those of the longer sequence, so any padding length works."""

    def __init__(self, sequences: Sequence[Sequence[int]], states: Sequence[torch.Tensor], pad_token_id: int) -> None:
        super().__init__()
        if len(sequences) != len(states):
            raise ValueError(f"TrunkLookup: {len(sequences)} sequences but {len(states)} hidden-state tensors")
        self.pad_token_id = int(pad_token_id)
        self.table: dict[tuple[int, ...], torch.Tensor] = {}
        for ids, h in zip(sequences, states):
            if h.shape[0] != len(ids):
                raise ValueError(f"TrunkLookup: a sequence of {len(ids)} tokens has hidden states for {h.shape[0]}")
            self.table[tuple(int(t) for t in ids)] = h.detach()
        first = states[0]
        self.hidden_size, self.dtype_ = first.shape[-1], first.dtype

    def lookup(self, ids: Sequence[int]) -> torch.Tensor:
        key = tuple(ids)
        while key not in self.table:
            if not key or key[-1] != self.pad_token_id:
                raise KeyError("TrunkLookup: a batch row is none of the sequences whose trunk was computed "
                               f"(its first tokens: {list(ids[:12])})")
            key = key[:-1]
        return self.table[key]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        batch, width = input_ids.shape
        out = torch.zeros(batch, width, self.hidden_size, dtype=self.dtype_, device=input_ids.device)
        for i, row in enumerate(input_ids.tolist()):
            h = self.lookup(row)
            out[i, :h.shape[0]] = h
        return out


def right_pad(sequences: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) [B, longest] of token sequences, right-padded with `pad_token_id`."""
    width = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), width), int(pad_token_id), dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for j, seq in enumerate(sequences):
        ids[j, :len(seq)] = torch.tensor(list(seq), dtype=torch.long)
        mask[j, :len(seq)] = 1
    return ids, mask


@torch.no_grad()
def bottom_states(model: nn.Module, sequences: Sequence[Sequence[int]], split: int, *, pad_token_id: int,
                  batch_size: int = 16) -> TrunkLookup:
    """The hidden states entering decoder layer `split` of `model` for each token sequence (only the
    embeddings and layers ..split-1 run), as a `TrunkLookup`. Batches of similar length, right-padded."""
    decoder = model.get_decoder()
    layers, norm = decoder.layers, decoder.norm
    if not 0 < split < len(layers):
        raise ValueError(f"bottom_states: split {split} must be inside the model's {len(layers)} layers")
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    states: list[torch.Tensor | None] = [None] * len(sequences)
    was_training = model.training
    model.eval()
    decoder.layers, decoder.norm = nn.ModuleList(list(layers)[:split]), nn.Identity()
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            ids, mask = right_pad([sequences[i] for i in idx], pad_token_id)
            hidden = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            for j, i in enumerate(idx):
                states[i] = hidden[j, :len(sequences[i])]
    finally:
        decoder.layers, decoder.norm = layers, norm
        model.train(was_training)
    return TrunkLookup(sequences, states, pad_token_id)  # type: ignore[arg-type]


class TopOnly:
    """`with TopOnly(model, lookup, split):` model's embeddings are `lookup` and its decoder keeps layers
    split.. only; on leaving, both are restored. `suspended()` restores them inside the block (e.g. to score
    a checkpoint with the full model)."""

    def __init__(self, model: nn.Module, lookup: TrunkLookup, split: int) -> None:
        self.decoder, self.lookup, self.split = model.get_decoder(), lookup, split
        self.embed, self.layers = self.decoder.embed_tokens, self.decoder.layers
        if not 0 < split < len(self.layers):
            raise ValueError(f"TopOnly: split {split} must be inside the model's {len(self.layers)} layers")

    def __enter__(self) -> TopOnly:
        self.decoder.embed_tokens = self.lookup
        self.decoder.layers = nn.ModuleList(list(self.layers)[self.split:])
        return self

    def __exit__(self, *exc) -> None:
        self.decoder.embed_tokens, self.decoder.layers = self.embed, self.layers

    def suspended(self) -> _Suspended:
        return _Suspended(self)


class _Suspended:
    def __init__(self, top: TopOnly) -> None:
        self.top = top

    def __enter__(self) -> None:
        self.top.__exit__()

    def __exit__(self, *exc) -> None:
        self.top.__enter__()
