"""Do the rows `qtarget profile` lists as most off-prior find the lab's planted noise?

    PYTHONPATH=src python docs/profile_example/off_prior_vs_noise.py

Profiles SmolLM2-135M-Instruct on the lab's 128 training demonstrations (seed 0, 30 % noisy) exactly as
make_datasets.py writes them, ranks rows by mean NLL (the profile's off-prior order) and prints how many of
the top rows are noisy and the AUROC of mean NLL for noisy vs clean rows (0.5 = no signal).
"""
from __future__ import annotations

import numpy as np

from qtarget.data import prepare_data
from qtarget.lab import tasks
from qtarget.models.load import load
from qtarget.profile import profile_examples
from qtarget.profile.summary import per_row


def auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(a noisy row's score > a clean row's), ties counted half."""
    diff = pos[:, None] - neg[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


def main() -> None:
    demos = tasks.demonstrations(tasks.shop_problems(128, 0), 0.3, 0)
    rows = [{"messages": [{"role": "system", "content": tasks.INSTRUCTION}, {"role": "user", "content": d["prompt"]},
                          {"role": "assistant", "content": d["response"]}]} for d in demos]
    model, tokenizer = load("smollm2", role="base", dtype="float32")
    examples = list(prepare_data(rows, tokenizer, max_length=1024).train)
    assert len(examples) == len(demos)
    stats = per_row(profile_examples(model, examples, pad_token_id=tokenizer.pad_token_id))
    nll = np.array([r["mean_nll"] for r in stats])
    noisy = np.array([d["noise"] != "clean" for d in demos])
    order = np.argsort(-nll, kind="stable")
    print(f"rows: {len(demos)}, noisy: {noisy.sum()} ({noisy.mean():.0%})")
    for k in (5, 10, 20, 38):
        print(f"top {k:>2} most off-prior rows: {noisy[order[:k]].sum()} noisy ({noisy[order[:k]].mean():.0%})")
    print(f"AUROC of row mean NLL, noisy vs clean: {auroc(nll[noisy], nll[~noisy]):.3f}")
    for kind in ("corrupt", "alternative"):
        sel = np.array([d["noise"] == kind for d in demos])
        print(f"  {kind}: AUROC vs clean {auroc(nll[sel], nll[~noisy]):.3f} ({sel.sum()} rows)")


if __name__ == "__main__":
    main()
