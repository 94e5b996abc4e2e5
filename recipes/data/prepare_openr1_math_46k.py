"""Write the PSFT recipe's training file: Elliott/Openr1-Math-46k-8192 as qtarget `messages` rows.

The rows match what the official PSFT repository (github.com/zwhong714/PSFT, prepare_data.py) builds
for training: a fixed system prompt, the problem as the user turn (the dataset's second prompt turn)
and the demonstration (the dataset's first target turn) as the assistant turn.

    python recipes/data/prepare_openr1_math_46k.py data/openr1_math_46k_8192.jsonl

Needs network access (datasets.load_dataset) the first time.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

SOURCE = "Elliott/Openr1-Math-46k-8192"
SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."


def to_messages(row: dict) -> dict:
    """One source row -> {"messages": [system, user, assistant]}."""
    return {"messages": [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": row["prompt"][1]["content"]},
        {"role": "assistant", "content": row["target"][0]["content"]},
    ]}


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[-3].strip(), file=sys.stderr)
        return 2
    from datasets import load_dataset

    out = Path(argv[0])
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = load_dataset(SOURCE, split="train")
    with out.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(to_messages(row), ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} rows to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
