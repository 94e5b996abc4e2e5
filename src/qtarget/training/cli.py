"""`qtarget train`: fine-tune a causal LM with any objective, from flags, a YAML recipe, or both.

    qtarget train --model PATH_OR_ID --dataset FILE_OR_NAME --objective dft --output_dir out --max_steps 100
    qtarget train --config recipes/cpu_smollm2_dft.yaml --learning_rate 1e-5 --resume

Every key of QTargetConfig (TrainingArguments + qtarget keys) is a flag; flags override the YAML.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
from pathlib import Path
from typing import Any

import yaml
from transformers.utils import logging as transformers_logging

from qtarget import cli
from qtarget.cli_args import parse_bool
from qtarget.data.reading import parse_chat_template
from qtarget.training.api import check_requirements, train
from qtarget.training.config import QTargetConfig, config_fields

CLI_ONLY = {"config", "help", "h"}
# the keys a first run needs, listed first by --help
ESSENTIAL = ("model", "dataset", "objective", "objective_args", "output_dir", "max_steps", "learning_rate")


def _type_name(f) -> str:
    return f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))


def _bool(text: Any, key: str) -> bool:
    return parse_bool(text, key)


def coerce(key: str, value: Any) -> Any:
    """A YAML or command-line value -> the type of QTargetConfig.<key>."""
    f = config_fields()[key]
    t = str(f.type).replace("typing.", "")
    if isinstance(value, str) and value.strip().lower() in ("none", "null", "~") and "None" in t:
        return None
    if value is None:
        return None
    if key == "chat_template":  # auto / true / false (qtarget.data.reading)
        return parse_chat_template(value, f"--{key}")
    try:
        if t in ("bool", "<class 'bool'>") or t.startswith("bool"):
            return _bool(value, key)
        if t in ("int", "<class 'int'>", "int | None") and not isinstance(value, bool):
            as_float = float(value)
            if as_float != int(as_float):
                raise ValueError(f"--{key}: expected an integer, got {value!r}")
            return int(as_float)
        if t in ("float", "<class 'float'>", "float | None"):
            return float(value)
        if key in ("objective_args", "lora_target_modules"):
            return value  # parsed by QTargetConfig itself (one place for the CLI, YAML and the API)
        if t.startswith("dict") and isinstance(value, str) and value.strip().startswith("{"):
            return yaml.safe_load(value)
    except (TypeError, ValueError) as e:
        if str(e).startswith(f"--{key}"):
            raise
        raise ValueError(f"--{key}: cannot read {value!r} as {t}") from None
    return value


def _help_order(item: tuple[str, Any]) -> tuple[bool, int]:
    name = item[0]
    return (name not in ESSENTIAL, ESSENTIAL.index(name) if name in ESSENTIAL else 0)


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(
        prog="qtarget train", usage="qtarget train [--config YAML] [--KEY VALUE ...]", allow_abbrev=False, argument_default=argparse.SUPPRESS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fine-tune a Hugging Face causal LM toward a designed target distribution.\n"
                    "Keys come from --config YAML, then --key value flags (flags win). Without a config file,\n"
                    "--model, --dataset, --objective and --output_dir are enough.")
    first = parser.add_argument_group(cli.ESSENTIAL_TITLE)
    first.add_argument("--config", help="YAML recipe with any of the keys below.")
    ours = parser.add_argument_group("qtarget keys")
    hf = parser.add_argument_group("transformers.TrainingArguments keys")
    fields = config_fields()
    qt_names = set(QTargetConfig.__annotations__)
    for name, f in sorted(fields.items(), key=_help_order):
        help_text = (f.metadata or {}).get("help", "") or ""
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if default is not dataclasses.MISSING:
            help_text = f"{help_text} [default: {getattr(default, 'value', default)}]"
        help_text = help_text.replace("%%", "%").replace("%", "%%")  # some library helps come escaped already
        group = first if name in ESSENTIAL else ours if name in qt_names else hf
        kwargs: dict[str, Any] = {"metavar": "VALUE", "help": help_text}
        if "bool" in str(f.type) and "dict" not in str(f.type):
            kwargs.update(nargs="?", const="true", metavar="BOOL")
        if name == "resume":
            kwargs.update(nargs="?", const="last", metavar="[last|CHECKPOINT]")
        group.add_argument(f"--{name}", **kwargs)
    return parser


def _check_keys(keys, where: str) -> None:
    valid = list(config_fields())
    for key in keys:
        if key not in config_fields():
            close = difflib.get_close_matches(key, valid, n=4, cutoff=0.6)
            hint = f"; did you mean {', '.join('--' + c if where == 'command line' else c for c in close)}?" if close else ""
            raise ValueError(f"unknown key {key!r} ({where}){hint} (`qtarget train --help` lists every key)")


def read_yaml_mapping(path: Path, flag: str = "--config") -> dict[str, Any]:
    """A YAML recipe as a dict, or a one-line error naming the flag, the file and (syntax) line and column."""
    if not path.is_file():
        raise FileNotFoundError(f"{flag} {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ValueError(f"{flag} {str(path)!r} is not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{flag} {str(path)!r} must hold a mapping of keys to values")
    return data


def load_config(argv: list[str]) -> QTargetConfig:
    """argv (flags and/or --config) -> a validated QTargetConfig. Raises ValueError on bad keys."""
    parser = build_parser()
    ns, extra = parser.parse_known_args(argv)
    unknown = [a.split("=", 1)[0][2:] for a in extra if a.startswith("--")]
    if unknown:
        _check_keys(unknown, "command line")
    if extra:
        raise ValueError(f"unexpected argument(s) {extra}: use --key value")
    given = vars(ns)
    values: dict[str, Any] = {}
    if "config" in given:
        path = Path(given.pop("config"))
        data = read_yaml_mapping(path)
        _check_keys(data, f"in {path}")
        values.update(data)
    values.update(given)
    values = {k: coerce(k, v) for k, v in values.items()}
    return QTargetConfig(**values)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        build_parser().print_help()
        return 0
    config = load_config(argv)  # bad input: ValueError / FileNotFoundError -> one line from qtarget.cli
    check_requirements(config)
    if config.disable_tqdm:  # also the loading / saving bars of transformers (this process ends with the run)
        transformers_logging.disable_progress_bar()
    result = train(config)
    last = result.history[-1] if result.history else {}
    shown = ", ".join(f"{k}={last[k]:.4g}" for k in ("loss", "nll", "p_y", "entropy", "gamma") if k in last)
    print(f"[qtarget] done: {result.global_step} steps; {shown}; outputs in {result.output_dir}")
    return 0


if __name__ == "__main__":  # pragma: no cover - `python -m ...`: through the one CLI wrapper
    sys.exit(cli.main(["train", *sys.argv[1:]]))
