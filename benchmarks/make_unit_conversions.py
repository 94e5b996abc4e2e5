"""A checkable user dataset for `qtarget lab --dataset` / `qtarget profile`: unit conversions.

    python benchmarks/make_unit_conversions.py out.jsonl --rows 150 --form chat        # messages rows
    python benchmarks/make_unit_conversions.py out.jsonl --rows 150 --form completion  # TRL prompt/completion

Each row converts a whole number of one unit into another (km -> m, kg -> g, h -> min, ...); the reply
works it out in one line and ends with "The answer is N."; an `answer` column holds N.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

CONVERSIONS = [("km", "m", 1000), ("m", "cm", 100), ("kg", "g", 1000), ("hours", "minutes", 60),
               ("minutes", "seconds", 60), ("days", "hours", 24), ("weeks", "days", 7), ("litres", "millilitres", 1000),
               ("dozen", "items", 12), ("feet", "inches", 12), ("yards", "feet", 3), ("tonnes", "kg", 1000)]


def rows(n: int, seed: int, form: str) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        src, dst, factor = rng.choice(CONVERSIONS)
        x = rng.randint(2, 60)
        question = f"Convert {x} {src} to {dst}."
        reply = f"1 {src[:-1] if src.endswith('s') else src} is {factor} {dst}, so {x} * {factor} = {x * factor}. " \
                f"The answer is {x * factor}."
        if form == "chat":
            row = {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]}
        else:
            row = {"prompt": f"{question}\n", "completion": reply}
        out.append({**row, "answer": x * factor})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("output")
    p.add_argument("--rows", type=int, default=150)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--form", choices=["chat", "completion"], default="chat")
    args = p.parse_args()
    path = Path(args.output)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows(args.rows, args.seed, args.form)))
    print(f"wrote {args.rows} rows to {path}")


if __name__ == "__main__":
    main()
