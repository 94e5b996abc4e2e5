"""Problems from a training data file (`qtarget eval --dataset FILE`), read as `qtarget train` reads it.

Each row is tokenised by the data path of training (`qtarget.data.tokenize.tokenize_row`, the same
chat-template default, `qtarget.data.reading`); the problem's prompt is the tokens training puts before
the row's last reply (`prompt_prefix`), so the model is asked exactly what it was trained to answer. The
gold answer is the row's `answer_column`, else the final answer its reply states (\\boxed{}, '#### X',
'The answer is X'); rows with neither are left out and counted.
"""
from __future__ import annotations

from typing import Any

from qtarget.data.formats import Conversation, detect_format, normalize_row
from qtarget.data.reading import parse_chat_template, prompt_prefix, templates_pairs
from qtarget.data.sources import load_rows
from qtarget.data.tokenize import TokenizeOptions, tokenize_row
from qtarget.evaluation.answers import answer_form, stated_answer
from qtarget.evaluation.benchmarks import Problem


def _question_and_reply(item: Any) -> tuple[str, str]:
    if isinstance(item, Conversation):
        msgs = item.messages
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        users = [m["content"] for m in msgs[:last] if m["role"] == "user"]
        return (users[-1] if users else ""), msgs[last]["content"]
    return item.prompt, item.response


def data_problems(source: Any, tokenizer, *, answer_column: str | None = "answer", chat_template: Any = None,
                  split: str = "train", name: str | None = None) -> tuple[list[Problem], str]:
    """(problems with `meta["prompt_ids"]`, one line saying how the file was read and what was left out)."""
    rows = load_rows(source, split=split, name=name)
    if len(rows) == 0:
        raise ValueError(f"--dataset {source!r} has no rows")
    fmt = detect_format(rows.column_names)
    if fmt == "text":
        raise ValueError(f"--dataset {source!r} has plain `text` rows: eval needs rows with a prompt and a reply")
    choice = parse_chat_template(chat_template)
    options = TokenizeOptions(max_length=None, chat_template=choice)
    templated = templates_pairs(fmt, choice, tokenizer)
    label = str(getattr(source, "name", source)).rsplit("/", 1)[-1]
    problems, no_answer, n_templated = [], 0, 0
    for i, row in enumerate(rows):
        item = normalize_row(row, fmt, i, chat_template=templated)
        question, reply = _question_and_reply(item)
        gold = row.get(answer_column) if answer_column else None
        if gold is None or not str(gold).strip():
            form = answer_form(reply)
            gold = None if form is None else stated_answer(reply, form)
        if gold is None:
            no_answer += 1
            continue
        example = tokenize_row(tokenizer, row, fmt, options, i)
        if example is None:
            raise ValueError(f"--dataset row {i}: nothing to supervise, so no prompt to ask")
        n_templated += int(example["templated"])
        problems.append(Problem(id=f"{label}/row{i}", question=question, answer=str(gold).strip(), source=label,
                                meta={"prompt_ids": prompt_prefix(example), "row": i}))
    if not problems:
        raise ValueError(f"--dataset {source!r}: no row has a checkable answer (a {answer_column!r} column, or a reply "
                         f"stating its final answer as \\boxed{{}}, '#### X' or 'The answer is X')")
    how = "the tokenizer's chat template" if n_templated == len(problems) else (
        "no chat template" if n_templated == 0 else f"the chat template on {n_templated} of {len(problems)} rows")
    line = (f"{len(rows)} rows ({fmt}, {how}) -> {len(problems)} problems prompted with the tokens training puts "
            f"before the reply" + (f"; {no_answer} rows without a checkable answer left out" if no_answer else ""))
    return problems, line
