"""Out-of-domain text for the forgetting metric: English prose paragraphs from the Python standard
library's docstrings. Nothing to download, the same on every machine with the same Python version,
and nothing like the lab's arithmetic demonstrations. A fine-tuned model whose NLL on these rises
above the base model's has forgotten some of its general language modelling.
"""
from __future__ import annotations

import importlib
import inspect
import random
import re
import sys

# Modules whose docstrings are mostly prose (importable without side effects or GUI libraries).
MODULES = ("argparse", "asyncio", "bisect", "calendar", "collections", "configparser", "contextlib", "copy",
           "csv", "dataclasses", "datetime", "decimal", "difflib", "doctest", "email.message", "enum",
           "fractions", "ftplib", "functools", "heapq", "http.client", "http.cookiejar", "imaplib", "inspect",
           "ipaddress", "itertools", "json", "logging", "mailbox", "optparse", "pathlib", "pdb", "pickle",
           "pprint", "queue", "random", "sched", "shutil", "smtplib", "socketserver", "sqlite3", "statistics",
           "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit",
           "unittest", "urllib.parse", "urllib.request", "uuid", "warnings", "zipfile")
MIN_WORDS = 20


def _docstrings(module_name: str) -> list[str]:
    try:
        module = importlib.import_module(module_name)
    except Exception:  # a platform without the module simply contributes nothing
        return []
    docs = [inspect.getdoc(module) or ""]
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        docs.append(inspect.getdoc(obj) or "")
        if inspect.isclass(obj):
            for member_name, member in sorted(vars(obj).items()):
                if not member_name.startswith("_") and callable(member):
                    docs.append(inspect.getdoc(member) or "")
    return docs


def _is_prose(paragraph: str) -> bool:
    words = paragraph.split()
    if len(words) < MIN_WORDS or ">>>" in paragraph or "::" in paragraph:
        return False
    letters = sum(c.isalpha() or c.isspace() for c in paragraph)
    return letters / len(paragraph) > 0.9 and paragraph[0].isupper()


def prose_paragraphs() -> list[str]:
    """Every distinct prose paragraph (>= 20 words, > 90 % letters and spaces) of the MODULES' docstrings,
    whitespace-normalised, sorted."""
    found: set[str] = set()
    for module_name in MODULES:
        for doc in _docstrings(module_name):
            for paragraph in re.split(r"\n\s*\n", doc):
                text = " ".join(paragraph.split())
                if text and _is_prose(text):
                    found.add(text)
    return sorted(found)


def ood_texts(n: int, seed: int) -> list[str]:
    """`n` paragraphs, a seeded sample of `prose_paragraphs()`."""
    pool = prose_paragraphs()
    if n > len(pool):
        raise ValueError(f"ood_texts: asked for {n} paragraphs, the standard library gives {len(pool)} on "
                         f"Python {sys.version.split()[0]}; lower --ood_texts")
    return random.Random(f"ood:{seed}").sample(pool, n)
