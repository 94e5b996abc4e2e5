"""Evaluation of reasoning answers: benchmarks, generation, answer checking, metrics, `qtarget eval`.

    evaluate(model, tokenizer, problems, *, samples=1, temperature=0.0, ...) -> EvalResult
    load_benchmark(name) / load_benchmarks("gsm8k_100,champ") -> list[Problem]
    check_answer(response, gold) -> bool
    pass_at_k(n, c, k) -> float
    HFGenerator(model, tokenizer) / VLLMGenerator(path)

Names load lazily so `qtarget.check_answer` does not import torch.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "check_answer": "answers", "extract_answer": "answers", "extract_choice": "answers",
    "Problem": "benchmarks", "load_benchmark": "benchmarks", "load_benchmarks": "benchmarks",
    "list_benchmarks": "benchmarks", "HubUnavailableError": "benchmarks",
    "Sample": "generation", "HFGenerator": "generation", "VLLMGenerator": "generation",
    "vllm_available": "generation",
    "pass_at_k": "metrics", "summarize": "metrics", "markdown_table": "metrics",
    "build_prompt": "prompts",
    "EvalResult": "runner", "evaluate": "runner", "read_records": "runner",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(f"qtarget.evaluation.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'qtarget.evaluation' has no attribute {name!r}")
