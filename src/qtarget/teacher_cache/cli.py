"""`qtarget teacher-cache`: run a teacher once over the tokenised training data and store its top-k
distribution per supervised token, for `qtarget train --teacher_cache DIR`.

    qtarget teacher-cache --teacher_model T --model S --dataset D --output_dir DIR --top_k 64
    qtarget teacher-cache --config recipe.yaml --top_k 64          # data keys (and teacher_cache as DIR) from a recipe
    torchrun --nproc_per_node 8 -m qtarget.teacher_cache.cli ...   # each process builds its own shards
    qtarget teacher-cache --engine vllm-server --endpoint http://gpu1:8000 --endpoint http://gpu2:8000 \
        --model S --dataset D --output_dir DIR --top_k 64           # a served teacher (vLLM; sglang-server: SGLang)
    qtarget teacher-cache --engine vllm --teacher_model T ...      # vllm.LLM in this process (GPU)

The data keys (dataset, max_length, packing, chat_template, response_only, eval_fraction, seed, ...)
mean what they mean for `qtarget train` and must be the same there: training checks every row.
A re-run with the same arguments continues where an interrupted one stopped (--resume: and insists
that there is a cache to continue).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig

from qtarget import cli
from qtarget.cli_args import add_bool_flag, check_number, check_output_path, parse_bool
from qtarget.data import prepare_data
from qtarget.teacher_cache.build import build_cache
from qtarget.teacher_cache.engines import ENGINES, SERVERS, VLLMLocal
from qtarget.teacher_cache.manifest import DATA_KEYS
from qtarget.teacher_cache.schema import DEFAULT_ENCODING, ENCODINGS
from qtarget.models.load import (
    check_same_vocabulary,
    check_source,
    load_aux_tokenizer,
    load_model,
    load_tokenizer,
    model_position_limit,
    resolve,
)
from qtarget.training.cli import coerce, read_yaml_mapping
from qtarget.training.config import RANGES, config_fields

# keys shared with `qtarget train` (same meaning, same parsing)
TRAIN_KEYS = ("model", "teacher_model", "dtype") + DATA_KEYS
CACHE_OPTIONS = {
    "output_dir": (str, None, "Cache folder (default: the recipe's teacher_cache)."),
    "top_k": (int, 64, "Teacher tokens stored per supervised token."),
    "temperature": (float, 1.0, "pi_T = softmax(teacher logits / temperature)."),
    "batch_size": (int, 8, "Rows per teacher forward."),
    "rows_per_shard": (int, 512, "Rows per shard file (the unit of resumption and of work per process)."),
    "logprob_dtype": (str, DEFAULT_ENCODING, f"How the log-probs are stored: {', '.join(ENCODINGS)} (compact: ~1/3 of "
                                             f"float32's bytes, loss and gradient within 1e-3; docs/teacher_cache.md)."),
    "device": (str, None, "Teacher device (default: cuda:LOCAL_RANK when CUDA is available, else cpu)."),
    "progress": (str, "true", "Show a progress bar (true/false)."),
    "resume": (str, "false", "Continue the cache in --output_dir (true/false); an error when there is none. A re-run "
                             "continues anyway; this says that it must."),
}
ENGINE_OPTIONS = {
    "engine": (str, "hf", f"Where the teacher runs: {', '.join(ENGINES)} (see docs/teacher_cache.md)."),
    "served_model": (str, None, "Servers: the served model's name (default: the one the endpoint lists)."),
    "concurrency": (int, 4, "Servers: requests in flight per endpoint."),
    "request_timeout": (float, 600.0, "Servers: seconds before a request is abandoned and retried."),
    "max_retries": (int, 5, "Servers: failures in a row (timeout, connection, 5xx) before an endpoint is dropped."),
    "retry_backoff": (float, 1.0, "Servers: first wait in seconds before a retry; doubles with each failure."),
}


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(prog="qtarget teacher-cache", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     argument_default=argparse.SUPPRESS, allow_abbrev=False)
    parser.add_argument("--config", help="YAML recipe of `qtarget train`: its data keys, model, teacher_model, "
                                         "dtype and teacher_cache (as output_dir) are used; other keys are ignored.")
    fields = config_fields()
    group = parser.add_argument_group("keys shared with `qtarget train`")
    for name in TRAIN_KEYS:
        f = fields[name]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        help_text = f"{(f.metadata or {}).get('help', '')} [default: {default}]".replace("%", "%%")
        kinds = {"metavar": "VALUE"}
        if str(f.type).replace("typing.", "") in ("<class 'bool'>", "bool", "bool | None"):  # --key, --key true|false
            kinds = {"nargs": "?", "const": "true", "metavar": "BOOL"}
        group.add_argument(f"--{name}", help=help_text, **kinds)
    ours = parser.add_argument_group("cache options")
    for name, (_, default, help_text) in CACHE_OPTIONS.items():
        if name in ("resume", "progress"):  # `--resume`, `--resume true|false`
            add_bool_flag(ours, name, default=argparse.SUPPRESS, help=f"{help_text} [default: {default}]")
        else:
            ours.add_argument(f"--{name}", metavar="VALUE", help=f"{help_text} [default: {default}]")
    engines = parser.add_argument_group("teacher engine")
    for name, (_, default, help_text) in ENGINE_OPTIONS.items():
        engines.add_argument(f"--{name}", metavar="VALUE", help=f"{help_text} [default: {default}]")
    engines.add_argument("--endpoint", metavar="URL", action="append",
                         help="Servers: a server's base URL (repeat for several; requests are spread over them).")
    return parser


def load_options(argv: list[str]) -> dict[str, Any]:
    """argv -> every key of TRAIN_KEYS and CACHE_OPTIONS, typed; raises ValueError on a bad key."""
    given = vars(build_parser().parse_args(argv))
    values: dict[str, Any] = {}
    if "config" in given:
        recipe = read_yaml_mapping(Path(given.pop("config")))
        values.update({k: v for k, v in recipe.items() if k in TRAIN_KEYS})
        if recipe.get("teacher_cache"):
            values["output_dir"] = recipe["teacher_cache"]
    values.update(given)
    fields = config_fields()
    out: dict[str, Any] = {}
    for name in TRAIN_KEYS:
        f = fields[name]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        out[name] = coerce(name, values[name]) if name in values else default
    for name, (kind, default, _) in {**CACHE_OPTIONS, **ENGINE_OPTIONS}.items():
        value = values.get(name, default)
        try:
            out[name] = None if value is None else kind(value)
        except (TypeError, ValueError):
            raise ValueError(f"--{name}: cannot read {value!r} as {kind.__name__}") from None
    out["progress"] = parse_bool(out["progress"], "progress")
    out["resume"] = parse_bool(out["resume"], "resume")
    out["endpoint"] = list(values.get("endpoint") or [])
    engine = out["engine"]
    if engine not in ENGINES:
        raise ValueError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    required = ("model", "dataset", "output_dir") + (() if engine in SERVERS else ("teacher_model",))
    for key in required:
        if not out.get(key):
            raise ValueError(f"--{key} is required")
    if engine in SERVERS and not out["endpoint"]:
        raise ValueError(f"--engine {engine} needs at least one --endpoint URL (e.g. http://localhost:8000)")
    if engine not in SERVERS and out["endpoint"]:
        raise ValueError(f"--endpoint is for --engine vllm-server / sglang-server, not --engine {engine}")
    for url in out["endpoint"]:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"--endpoint must be an http:// or https:// URL, got {url!r}")
    if engine != "hf" and out["temperature"] != 1.0:
        raise ValueError(f"--temperature: --engine {engine} caches the raw distribution at temperature 1; build "
                         f"with --temperature 1 and set the objective's temperature instead")
    for key, low in (("concurrency", 1), ("max_retries", 1), ("request_timeout", 1e-9), ("retry_backoff", 0)):
        if out[key] < low:
            raise ValueError(f"--{key} must be {'>= ' + str(low) if low in (0, 1) else '> 0'}, got {out[key]}")
    if out["logprob_dtype"] not in ENCODINGS:
        raise ValueError(f"--logprob_dtype must be one of {', '.join(ENCODINGS)}, got {out['logprob_dtype']!r}")
    check_ranges(out)
    return out


def check_ranges(out: dict[str, Any]) -> None:
    """The numeric keys in range (the data keys as `qtarget train` checks them), the output folder
    creatable, and the model folders there, before any data or model loads."""
    for key in TRAIN_KEYS:
        if key in RANGES:
            check_number(key, out[key], **RANGES[key])
    for key, low, low_open in (("top_k", 1, False), ("batch_size", 1, False), ("rows_per_shard", 1, False),
                               ("temperature", 0, True)):
        check_number(key, out[key], low, low_open=low_open, integer=key != "temperature")
    check_output_path(out["output_dir"])
    check_source(out["model"], "student")
    if out["engine"] in ("hf", "vllm"):
        check_source(out["teacher_model"], "teacher")


def fit_max_length(opts: dict[str, Any]) -> None:
    """--max_length no longer than the student's and the (local) teacher's position limit, clamped with a
    warning as `qtarget train` clamps it (so the cache and the training run read the same rows)."""
    roles = [("model", "student")] + ([("teacher_model", "teacher")] if opts["engine"] in ("hf", "vllm") else [])
    limits = [(limit, role) for key, role in roles
              if (limit := model_position_limit(opts[key], role)) is not None]
    if not limits:
        return
    limit, role = min(limits)
    if opts["max_length"] is None or opts["max_length"] > limit:
        warnings.warn(f"--max_length {opts['max_length']} is beyond the {role} model's position limit ({limit}, its "
                      f"config's max_position_embeddings / n_positions): using --max_length {limit}", stacklevel=2)
        opts["max_length"] = limit


def student_vocab_size(name: str) -> int:
    """The student's LM-head rows, from its config (no weights loaded)."""
    config = AutoConfig.from_pretrained(resolve(name))
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text.vocab_size)


def make_engine(opts: dict[str, Any]):
    """The teacher engine the options name (the hf teacher is loaded by `run`)."""
    if opts["engine"] in SERVERS:
        return SERVERS[opts["engine"]](opts["endpoint"], teacher_name=opts["teacher_model"],
                                       served_model=opts["served_model"], concurrency=opts["concurrency"],
                                       timeout=opts["request_timeout"], max_retries=opts["max_retries"],
                                       backoff=opts["retry_backoff"])
    return VLLMLocal(resolve(opts["teacher_model"]), top_k=opts["top_k"], dtype=opts["dtype"],
                     teacher_name=opts["teacher_model"])


def run(opts: dict[str, Any]):
    tokenizer = load_tokenizer(opts["model"])
    fit_max_length(opts)
    data = prepare_data(opts["dataset"], tokenizer, max_length=opts["max_length"], response_only=opts["response_only"],
                        chat_template=opts["chat_template"], packing=opts["packing"],
                        eval_fraction=opts["eval_fraction"], eval_source=opts["eval_dataset"], seed=opts["seed"],
                        split=opts["dataset_split"], dataset_config=opts["dataset_config"], max_rows=opts["max_rows"])
    print(f"[qtarget] teacher-cache data: {data.report.summary()}", file=sys.stderr)
    if opts["engine"] in ("hf", "vllm"):
        teacher_tok = load_aux_tokenizer(opts["teacher_model"], "teacher")
        if teacher_tok is not None:
            check_same_vocabulary(tokenizer, teacher_tok, role="teacher", student_name=opts["model"],
                                  other_name=opts["teacher_model"])
    if opts["engine"] == "hf":
        device = opts["device"]
        if device is None:
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
        teacher = load_model(opts["teacher_model"], role="teacher", dtype=opts["dtype"]).to(device)
    else:
        teacher = make_engine(opts)
    return build_cache(
        teacher, tokenizer, data.train, opts["output_dir"], top_k=opts["top_k"], temperature=opts["temperature"],
        vocab_size=student_vocab_size(opts["model"]), eval_examples=data.eval,
        settings={k: opts[k] for k in DATA_KEYS}, teacher_name=opts["teacher_model"], student=opts["model"],
        batch_size=opts["batch_size"], rows_per_shard=opts["rows_per_shard"], logprob_dtype=opts["logprob_dtype"],
        progress=opts["progress"], resume=opts["resume"])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = load_options(argv)  # bad input: ValueError / FileNotFoundError -> one line from qtarget.cli
    try:
        manifest = run(opts)
    except KeyboardInterrupt:  # the shards written so far are complete; a re-run continues
        print(f"[qtarget] teacher-cache interrupted: the complete shards stay in {opts['output_dir']}; re-run with "
              f"the same arguments and --resume to continue", file=sys.stderr)
        return 130
    folder = Path(opts["output_dir"])
    n_bytes = sum(p.stat().st_size for p in folder.glob("*/shard-*.safetensors"))
    n_tokens = sum(s.supervised_tokens for s in manifest.splits.values())
    rows = ", ".join(f"{name}: {s.rows} rows, {s.supervised_tokens} tokens" for name, s in manifest.splits.items())
    print(f"[qtarget] teacher cache in {folder} ({rows}; k={manifest.top_k}; "
          f"{n_bytes / max(n_tokens, 1):.0f} bytes per supervised token on disk so far)")
    return 0


if __name__ == "__main__":  # pragma: no cover - `python -m ...`: through the one CLI wrapper
    sys.exit(cli.main(["teacher-cache", *sys.argv[1:]]))
