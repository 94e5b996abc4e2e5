"""Turning a `Problem` into prompt token ids.

Styles:
    "chat"   the tokenizer's chat template: user turn = question + instruction, generation prompt added
    "plain"  "Problem: ...\\n<instruction>\\nSolution:" for base models without a template
    "auto"   "chat" when the tokenizer has a chat template, else "plain"
The instruction asks for step-by-step reasoning ending in \\boxed{} (a letter for multiple choice); pass
`instruction=` to change it.
"""
from __future__ import annotations

import re
from typing import Any

from qtarget.evaluation.benchmarks import Problem

__all__ = ["DEFAULT_INSTRUCTION", "CHOICE_INSTRUCTION", "PROMPT_STYLES", "is_multiple_choice", "build_prompt",
           "prompt_ids"]

DEFAULT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
CHOICE_INSTRUCTION = ("Please reason step by step, and put the letter of the correct option within \\boxed{}, "
                      "for example \\boxed{A}.")
PROMPT_STYLES = ("auto", "chat", "plain")


def is_multiple_choice(problem: Problem) -> bool:
    """A gold letter A-E and the options "(A)" ... in the question."""
    return bool(re.fullmatch(r"[A-E]", problem.answer.strip())) and "(A)" in problem.question


def resolve_style(tokenizer: Any, style: str) -> str:
    if style not in PROMPT_STYLES:
        raise ValueError(f"prompt_style must be one of {PROMPT_STYLES}, got {style!r}")
    if style == "auto":
        return "chat" if getattr(tokenizer, "chat_template", None) else "plain"
    if style == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ValueError("prompt_style='chat' but the tokenizer has no chat template; use 'plain' or 'auto'")
    return style


def build_prompt(tokenizer: Any, problem: Problem, *, style: str = "auto", instruction: str | None = None,
                 system_prompt: str | None = None) -> str:
    """The prompt text for one problem (chat template applied for the "chat" style)."""
    style = resolve_style(tokenizer, style)
    if instruction is None:
        instruction = CHOICE_INSTRUCTION if is_multiple_choice(problem) else DEFAULT_INSTRUCTION
    if style == "chat":
        messages = []
        if system_prompt:
            messages.append({"role": "system", "content": system_prompt})
        messages.append({"role": "user", "content": f"{problem.question}\n\n{instruction}".strip()})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    head = f"{system_prompt}\n\n" if system_prompt else ""
    return f"{head}Problem: {problem.question}\n{instruction}\nSolution:"


def prompt_ids(tokenizer: Any, problem: Problem, *, style: str = "auto", instruction: str | None = None,
               system_prompt: str | None = None) -> list[int]:
    """Token ids of `build_prompt` (no extra special tokens for chat; the tokenizer's defaults for plain)."""
    resolved = resolve_style(tokenizer, style)
    text = build_prompt(tokenizer, problem, style=resolved, instruction=instruction, system_prompt=system_prompt)
    ids = tokenizer(text, add_special_tokens=(resolved == "plain"))["input_ids"]
    return list(ids)
