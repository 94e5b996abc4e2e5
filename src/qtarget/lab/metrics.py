"""What the lab measures, as per-item values (one number per item; `qtarget.lab.stats` does the rest).

Teacher-forced metrics (no generation; `Scorer` gives every scored token's log-prob and predictive
entropy, one forward per sequence):
- noise fit: log-prob gain (trained - base) on the tokens a corrupted demonstration changed, per
  demonstration; and on the same (correct) tokens of clean demonstrations;
- answer ranking: 1 when the correct demonstration of a held-out problem has a higher total log-prob
  than every corrupted one (distractors), else 0;
- held-out entropy / NLL: mean predictive entropy / NLL over a held-out correct demonstration's tokens;
- forgetting: NLL per token of an out-of-domain paragraph (trained - base gives the change).
Generation metric: greedy accuracy with format failures (no "The answer is N") counted apart.

Only the top layers of a lab model are trained, so the hidden states entering them are the same for
the base and every fine-tuned model: `Scorer` computes them once (with the base model) and runs only the
top layers of each fine-tuned model.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from qtarget.data import TokenizeOptions, tokenize_rows
from qtarget.evaluation import evaluate
from qtarget.lab.task import LabTask
from qtarget.lab.trunk import TrunkLookup, right_pad

IGNORE = -100


@dataclass
class TokenScores:
    """Per scored token of one sequence: log p(token) and the entropy of the predictive distribution."""

    logp: np.ndarray     # [T]
    entropy: np.ndarray  # [T]


def trunk_split(model: nn.Module, train_top_layers: int) -> int | None:
    """Index of the first trained decoder layer, or None when everything trains (no shared trunk)."""
    n = len(model.get_decoder().layers)
    return None if train_top_layers <= 0 else n - train_top_layers


def shares_trunk(base: nn.Module, model: nn.Module, split: int) -> bool:
    """Whether `model` has the base's embeddings and bottom `split` decoder layers, bit for bit."""
    a, b = base.get_decoder(), model.get_decoder()
    pairs = [(a.embed_tokens.weight, b.embed_tokens.weight)]
    for la, lb in zip(a.layers[:split], b.layers[:split]):
        pairs += list(zip(la.parameters(), lb.parameters()))
    return all(torch.equal(x, y) for x, y in pairs)


def _collate(rows: Sequence[dict], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids, mask = right_pad([r["input_ids"] for r in rows], pad_token_id)
    labels = torch.full(ids.shape, IGNORE, dtype=torch.long)
    for i, r in enumerate(rows):
        labels[i, :len(r["labels"])] = torch.tensor(r["labels"])
    return ids, labels, mask


class Scorer:
    """Teacher-forced token scores of a fixed list of sequences ({input_ids, labels}; tokens with a label
    other than -100 are scored) under many models that share the base model's frozen trunk.

    `Scorer(base, sequences, split=k)` runs the base model once and keeps the hidden states entering
    decoder layer k; `score(model)` then runs layers k.. of `model` only. split=None: full forwards."""

    def __init__(self, base: nn.Module, sequences: Sequence[dict], *, pad_token_id: int, split: int | None,
                 batch_size: int = 16) -> None:
        if not sequences:
            raise ValueError("Scorer: no sequences to score")
        for i, s in enumerate(sequences):
            if not any(t != IGNORE for t in s["labels"][1:]):
                raise ValueError(f"Scorer: sequence {i} has no scored token")
        self.base, self.split, self.pad_token_id = base, split, pad_token_id
        # batches of similar length (less padding); results are returned in the input order
        self.order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]["input_ids"]))
        self.batches = []
        for start in range(0, len(self.order), batch_size):
            idx = self.order[start:start + batch_size]
            self.batches.append((idx, *_collate([sequences[i] for i in idx], pad_token_id)))
        self.trunk: list[torch.Tensor] = []
        self.base_scores = self._run(base, capture=split is not None)

    @torch.no_grad()
    def _run(self, model: nn.Module, capture: bool = False) -> list[TokenScores]:
        was_training = model.training
        model.eval()
        out: list[TokenScores | None] = [None] * len(self.order)
        try:
            for b, (idx, ids, labels, mask) in enumerate(self.batches):
                if capture:
                    hidden = self._capture_forward(model, ids, mask)
                elif self.split is not None:
                    hidden = _top_forward(model, self.trunk[b], mask, self.split)
                else:
                    hidden = model.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
                target = labels[:, 1:]
                scored = target != IGNORE                              # [B, L-1]
                logits = model.get_output_embeddings()(hidden[:, :-1][scored]).float()   # [n, V]
                logp_all = torch.log_softmax(logits, dim=-1)
                logp = logp_all.gather(-1, target[scored].unsqueeze(-1)).squeeze(-1)    # [n]
                entropy = -(logp_all.exp() * logp_all).sum(-1)                          # [n]
                counts = scored.sum(1).tolist()
                for i, lp, ent in zip(idx, logp.split(counts), entropy.split(counts)):
                    out[i] = TokenScores(lp.numpy().astype(np.float64), ent.numpy().astype(np.float64))
        finally:
            model.train(was_training)
        return out  # type: ignore[return-value]

    def _capture_forward(self, model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Full forward of the base model, keeping the input of decoder layer `split`."""
        decoder = model.get_decoder()
        kept: list[torch.Tensor] = []
        hook = decoder.layers[self.split].register_forward_pre_hook(
            lambda _m, args, kwargs: kept.append((args[0] if args else kwargs["hidden_states"]).detach()),
            with_kwargs=True)
        try:
            hidden = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        finally:
            hook.remove()
        self.trunk.append(kept[0])
        return hidden

    def trunk_lookup(self) -> TrunkLookup:
        """The kept hidden states entering layer `split`, per sequence, as an embedding stand-in for
        training the top layers alone (`qtarget.lab.trunk`)."""
        if self.split is None:
            raise ValueError("Scorer: no shared trunk (split=None) to look up")
        sequences, states = [], []
        for (idx, ids, _labels, mask), hidden in zip(self.batches, self.trunk):
            for j in range(len(idx)):
                n = int(mask[j].sum())
                sequences.append(ids[j, :n].tolist())
                states.append(hidden[j, :n])
        return TrunkLookup(sequences, states, self.pad_token_id)

    def score(self, model: nn.Module) -> list[TokenScores]:
        """Scores under `model`, which must share the base's trunk (checked)."""
        if self.split is not None and not shares_trunk(self.base, model, self.split):
            raise ValueError(f"Scorer: the model's bottom {self.split} layers or embeddings differ from the base "
                             f"model's; the shared trunk cannot be reused")
        return self._run(model)


def _top_forward(model: nn.Module, hidden: torch.Tensor, mask: torch.Tensor, split: int) -> torch.Tensor:
    """Decoder layers split.. (and the final norm) of `model` on hidden states entering layer `split`."""
    decoder = model.get_decoder()
    layers = decoder.layers
    decoder.layers = nn.ModuleList(list(layers)[split:])
    try:
        return decoder(inputs_embeds=hidden, attention_mask=mask, use_cache=False).last_hidden_state
    finally:
        decoder.layers = layers


# ------------------------------------------------------------------------------------ sequences
def chat_sequence(tokenizer, prompt: str, response: str, max_length: int, *, instruction: str | None,
                  template: bool = True) -> dict:
    """The lab's chat format (system = the task's instruction, none when None; user = prompt, assistant =
    response; only the response and its end-of-turn are scored), exactly as in training; `template` False
    (a task read from plain prompt/completion rows): prompt + response + eos, as `qtarget train` reads them."""
    if template:
        system = [] if instruction is None else [{"role": "system", "content": instruction}]
        row = {"messages": [*system, {"role": "user", "content": prompt}, {"role": "assistant", "content": response}]}
    elif instruction is not None:
        raise ValueError("a task read without the chat template has no system turn (instruction must be None)")
    else:
        row = {"prompt": prompt, "completion": response}
    (example,), report = tokenize_rows(tokenizer, [row], TokenizeOptions(max_length=max_length, chat_template=template))
    if report.truncated:
        raise ValueError(f"a lab sequence exceeds max_length={max_length}; raise --max_length")
    return {"input_ids": list(example["input_ids"]), "labels": list(example["labels"])}


def text_sequence(tokenizer, text: str, max_tokens: int) -> dict:
    """Plain text, cut to `max_tokens` tokens; every token after the first is scored."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
    if len(ids) < 2:
        raise ValueError(f"text too short to score: {text!r}")
    return {"input_ids": ids, "labels": [IGNORE] + ids[1:]}


def changed_tokens(sequence: dict, reference: dict) -> np.ndarray:
    """Boolean mask over `sequence`'s scored tokens: the tokens that differ from `reference`'s scored
    tokens (difflib opcodes: replaced or deleted tokens; where `reference` only inserts, e.g. '6' -> '16',
    the token before which it inserts), i.e. the tokens a corruption changed."""
    a = [t for t in sequence["labels"] if t != IGNORE]
    b = [t for t in reference["labels"] if t != IGNORE]
    changed = np.zeros(len(a), dtype=bool)
    for tag, i1, i2, _, _ in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if tag in ("replace", "delete"):
            changed[i1:i2] = True
        elif tag == "insert":
            changed[min(i1, len(a) - 1)] = True
    return changed[1:] if sequence["labels"][0] != IGNORE else changed  # the first position is never scored


# ------------------------------------------------------------------------------------ per-item metrics
def noise_fit_items(model_scores: Sequence[TokenScores], base_scores: Sequence[TokenScores],
                    kinds: Sequence[str], changed: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """Per training demonstration, the mean log-prob gain (model - base) over its `changed` tokens: for a
    'corrupt' one the tokens the corruption changed, for an 'alternative' one the tokens the other form
    changed, for a 'clean' one the (correct) tokens a corruption would have changed there — the matched
    control: the same kind of token, result digits, but right. Returns {kind: [n_kind]}."""
    out: dict[str, list[float]] = {"corrupt": [], "alternative": [], "clean": []}
    for m, b, kind, mask in zip(model_scores, base_scores, kinds, changed, strict=True):
        if not mask.any():
            raise ValueError(f"a {kind} demonstration has no changed token to measure")
        out[kind].append(float((m.logp - b.logp)[mask].mean()))
    return {k: np.asarray(v) for k, v in out.items()}


def ranking_items(scores: Sequence[TokenScores], n_candidates: int) -> dict[str, np.ndarray]:
    """Scores of `n_candidates` consecutive candidates per item (correct first) -> per item:
    correct (1 if the correct one has the highest total log-prob), margin (total log-prob of the correct
    one minus the best distractor's, nats: the continuous version of `correct`), held-out entropy and NLL
    (mean over the correct candidate's tokens)."""
    if len(scores) % n_candidates:
        raise ValueError(f"{len(scores)} scored candidates is not a multiple of {n_candidates}")
    totals = np.array([s.logp.sum() for s in scores]).reshape(-1, n_candidates)
    margin = totals[:, 0] - totals[:, 1:].max(axis=1)
    right = scores[::n_candidates]
    return {"correct": (margin > 0).astype(np.float64), "margin": margin,
            "entropy": np.array([s.entropy.mean() for s in right]), "nll": np.array([-s.logp.mean() for s in right])}


PRIOR_LOW = 0.1       # a token the base model gives p_y < 0.1 counts as "unlikely under the prior"
PRIOR_BINS = 10       # histogram of p_y over [0, 1]


def prior_profile(scores: Sequence[TokenScores], low: float = PRIOR_LOW) -> dict[str, Any]:
    """How probable a task's demonstration tokens already are under the base model: the distribution of
    p_y = exp(log p(token)) over every scored token of `scores` (the base model's token scores of the
    demonstrations). {tokens, mean, median, quartiles, share_low (p_y < low), low, histogram (counts over
    PRIOR_BINS equal bins of [0, 1])}."""
    if not scores:
        raise ValueError("prior_profile: no token scores")
    p = np.exp(np.concatenate([s.logp for s in scores]))
    counts, _ = np.histogram(p, bins=PRIOR_BINS, range=(0.0, 1.0))
    q1, median, q3 = np.quantile(p, [0.25, 0.5, 0.75])
    return {"tokens": int(p.size), "mean": float(p.mean()), "median": float(median), "q1": float(q1),
            "q3": float(q3), "share_low": float((p < low).mean()), "low": low, "histogram": counts.tolist()}


def nll_items(scores: Sequence[TokenScores]) -> np.ndarray:
    """Mean NLL per token of each sequence."""
    return np.array([-s.logp.mean() for s in scores])


def generation_items(model: nn.Module, tokenizer, task: LabTask, *, max_new_tokens: int, batch_size: int,
                     seed: int) -> dict[str, Any]:
    """Greedy answers to `task.generation` through `qtarget.evaluation.evaluate`, graded by the stated final
    answer (`task.parse_answer`). Per problem: correct (stated answer right), no_answer (no stated answer: a
    format failure, apart from a wrong answer; absent when the task has no answer form, `task.answer_form` None),
    cut (hit max_new_tokens); plus the responses. A problem with `meta["prompt_ids"]` is prompted with exactly
    those tokens (a task read from your data: the tokens training puts before the reply)."""
    problems = task.generation
    res = evaluate(model, tokenizer, list(problems), samples=1, temperature=0.0, max_new_tokens=max_new_tokens,
                   batch_size=batch_size, seed=seed, progress=False, instruction="", system_prompt=task.instruction,
                   prompt_style="chat", model_name="lab")
    by_id = {r["problem_id"]: r for r in res.records}
    stated = [task.parse_answer(by_id[p.id]["response"]) for p in problems]
    out = {
        "correct": np.array([s == p.answer for s, p in zip(stated, problems)], dtype=np.float64),
        "no_answer": np.array([s is None for s in stated], dtype=np.float64),
        "cut": np.array([bool(by_id[p.id]["cut"]) for p in problems], dtype=np.float64),
        "tokens": np.array([by_id[p.id]["num_tokens"] for p in problems], dtype=np.float64),
        "responses": [by_id[p.id]["response"] for p in problems],
    }
    if task.answer_form is None:  # no form to fail: the metric is absent (task.format_note says why)
        del out["no_answer"]
    return out
