"""What the lab measures on one model: in-domain and out-of-domain accuracy (greedy generation through
`qtarget.evaluation.evaluate`, graded by the lab's exact-integer checker), and the mean predictive
entropy and NLL on held-out clean demonstrations (teacher-forced, no generation)."""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch import nn

from qtarget.lab.tasks import INSTRUCTION, LabProblem, is_correct


def as_eval_problems(problems: Sequence[LabProblem]):
    """LabProblems -> `qtarget.evaluation.Problem`s (the question is the user turn; the instruction goes
    in as the system prompt, exactly as in the training demonstrations)."""
    from qtarget.evaluation import Problem

    return [Problem(id=p.id, question=p.question, answer=str(p.answer), source=p.task) for p in problems]


def generation_metrics(model: nn.Module, tokenizer, problems: Sequence[LabProblem], *, max_new_tokens: int,
                       batch_size: int, seed: int) -> dict[str, Any]:
    """Greedy accuracy on `problems`: {accuracy, n, mean_tokens, cut_rate, gen_entropy, agree_check_answer,
    samples: [{id, response, correct}]}."""
    from qtarget.evaluation import evaluate

    res = evaluate(model, tokenizer, as_eval_problems(problems), samples=1, temperature=0.0,
                   max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed, progress=False,
                   instruction="", system_prompt=INSTRUCTION, prompt_style="chat", model_name="lab")
    by_id = {p.id: p for p in problems}
    samples, correct, agree = [], 0, 0
    for r in res.records:
        ok = is_correct(r["response"], by_id[r["problem_id"]].answer)
        correct += ok
        agree += ok == bool(r["correct"])
        samples.append({"id": r["problem_id"], "response": r["response"], "correct": ok})
    ent = [r["entropy"] for r in res.records if r.get("entropy") is not None]
    n = len(res.records)
    return {
        "accuracy": correct / n, "n": n,
        "mean_tokens": sum(r["num_tokens"] for r in res.records) / n,
        "cut_rate": sum(bool(r["cut"]) for r in res.records) / n,
        "gen_entropy": sum(ent) / len(ent) if ent else None,
        "agree_check_answer": agree / n,
        "samples": samples,
    }


@torch.no_grad()
def heldout_metrics(model: nn.Module, examples: Sequence[dict], *, pad_token_id: int, batch_size: int = 8
                    ) -> dict[str, float]:
    """Mean predictive entropy H(p_t) and NLL of the demonstrated token over the supervised (response)
    tokens of tokenised held-out examples ({input_ids, labels}); logits are formed per batch only."""
    from qtarget.data import Collator

    collate = Collator(pad_token_id)
    was_training = model.training
    model.eval()
    ent_sum = nll_sum = 0.0
    count = 0
    try:
        for start in range(0, len(examples), batch_size):
            batch = collate(list(examples[start:start + batch_size]))
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            labels = batch["labels"][:, 1:]
            mask = labels != -100
            logp = torch.log_softmax(logits[mask].float(), dim=-1)      # [n, V]
            ent_sum += float(-(logp.exp() * logp).sum(-1).sum())
            nll_sum += float(-logp.gather(-1, labels[mask].unsqueeze(-1)).sum())
            count += int(mask.sum())
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("held-out examples have no supervised token")
    return {"entropy": ent_sum / count, "nll": nll_sum / count, "tokens": count}


def measure_model(model: nn.Module, tokenizer, *, in_domain: Sequence[LabProblem], ood: Sequence[LabProblem],
                  heldout: Sequence[dict], max_new_tokens: int, batch_size: int, seed: int,
                  on_part: Callable[[str], None] | None = None) -> dict[str, Any]:
    """All per-model metrics. `on_part(name)` is called after each part (for the progress display)."""
    out: dict[str, Any] = {}
    out["in_domain"] = generation_metrics(model, tokenizer, in_domain, max_new_tokens=max_new_tokens,
                                          batch_size=batch_size, seed=seed)
    if on_part:
        on_part("in_domain")
    out["ood"] = generation_metrics(model, tokenizer, ood, max_new_tokens=max_new_tokens,
                                    batch_size=batch_size, seed=seed)
    if on_part:
        on_part("ood")
    out["heldout"] = heldout_metrics(model, heldout, pad_token_id=tokenizer.pad_token_id)
    if on_part:
        on_part("heldout")
    for part in ("in_domain", "ood"):
        if not math.isfinite(out[part]["accuracy"]):
            raise RuntimeError(f"non-finite {part} accuracy")
    return out
