"""Argument types and range checks shared by every `qtarget` command.

One place for what a flag accepts, so `train`, `teacher-cache`, `profile`, `eval` and `lab` read a
number, a range and a boolean the same way:

- `integer(low, high)` / `real(low, high, ...)`: argparse `type=` callables that refuse a value outside
  its range (and NaN / inf) with "must be ..., got X"; argparse prefixes the flag ("argument --steps: ...").
- `check_number(name, value, ...)`: the same check on a value that is already a number (a YAML key, an
  API argument); the error names `--name`.
- `add_bool_flag`: a boolean flag that takes `--flag`, `--flag true` and `--flag false` (also yes/no,
  1/0, on/off), in every command.
- `join_negative_values`: `--flag -1e-3` reaches the flag as its value. argparse reads a token that
  starts with '-' as an option unless it looks like `-1` or `-0.5`, so `-1e-3`, `-inf` or `-1E3` would
  otherwise end in "expected one argument" instead of the range error.
"""
from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

TRUE_WORDS = ("true", "1", "yes", "y", "on")
FALSE_WORDS = ("false", "0", "no", "n", "off")


def parse_bool(value: Any, name: str | None = None) -> bool:
    """true/false (yes/no, 1/0, on/off, any case) or a bool -> bool; anything else is a ValueError
    naming `--name` when given."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in TRUE_WORDS:
        return True
    if text in FALSE_WORDS:
        return False
    where = f"--{name}: " if name else ""
    raise ValueError(f"{where}expected true or false, got {value!r}")


def boolean(text: str) -> bool:
    """argparse type of a boolean flag's optional value."""
    try:
        return parse_bool(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{e} (`--flag`, `--flag true` or `--flag false`)") from None


def add_bool_flag(parser: argparse.ArgumentParser | Any, name: str, *, default: bool | None = False,
                  help: str | None = None, **kwargs: Any) -> argparse.Action:
    """`--name` (= true), `--name true`, `--name false` on `parser` (a parser, group or mutually
    exclusive group). `name` is given without dashes."""
    return parser.add_argument(f"--{name}", nargs="?", const=True, default=default, type=boolean,
                               metavar="BOOL", help=help, **kwargs)


def describe_range(low: float | None, high: float | None, low_open: bool = False, high_open: bool = False,
                   integer: bool = False) -> str:
    """'>= 1', '> 0', 'in [0, 1)', ... (the phrase the errors use)."""
    kind = "an integer " if integer else ""
    if low is not None and high is not None:
        return f"{kind}in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{kind}{'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"{kind}{'<' if high_open else '<='} {high:g}"
    return "an integer" if integer else "a finite number"


def range_error(value: Any, low: float | None = None, high: float | None = None, *, low_open: bool = False,
                high_open: bool = False, integer: bool = False) -> str | None:
    """None when `value` (a number) is finite and inside the range, else "must be ..., got X"."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        want = "an integer" if integer else "a number"
        return f"must be {want}, got {value!r}"
    if integer and (isinstance(value, float) and (not math.isfinite(value) or value != int(value))):
        return f"must be an integer, got {value!r}"
    if not math.isfinite(value):
        return f"must be a finite number, got {value!r}"
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if below or above:
        return f"must be {describe_range(low, high, low_open, high_open)}, got {value!r}"
    return None


def check_number(name: str, value: Any, low: float | None = None, high: float | None = None, *,
                 low_open: bool = False, high_open: bool = False, integer: bool = False,
                 allow_none: bool = True) -> None:
    """ValueError "--name must be ..., got X" when `value` is outside the range (None passes when allowed)."""
    if value is None and allow_none:
        return
    problem = range_error(value, low, high, low_open=low_open, high_open=high_open, integer=integer)
    if problem:
        raise ValueError(f"--{name} {problem}")


def _read_number(text: str, integer: bool) -> float | int:
    try:
        number = float(str(text).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if integer else 'a number'}, got {text!r}") from None
    if integer:
        if not math.isfinite(number) or number != int(number):
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}")
        return int(number)
    return number


def integer(low: int | None = None, high: int | None = None) -> Callable[[str], int]:
    """argparse type: an integer in [low, high] (either bound may be None). '1e3' reads as 1000."""

    def read(text: str) -> int:
        value = _read_number(text, True)
        problem = range_error(value, low, high, integer=True)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    read.__name__ = f"integer {describe_range(low, high, integer=True)}"
    return read


def real(low: float | None = None, high: float | None = None, *, low_open: bool = False,
         high_open: bool = False) -> Callable[[str], float]:
    """argparse type: a finite number in the range (open or closed at each end)."""

    def read(text: str) -> float:
        value = _read_number(text, False)
        problem = range_error(value, low, high, low_open=low_open, high_open=high_open)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    read.__name__ = f"number {describe_range(low, high, low_open, high_open)}"
    return read


positive_int = integer(1)
nonneg_int = integer(0)
positive_float = real(0, low_open=True)
nonneg_float = real(0)
probability = real(0, 1)
open_unit = real(0, 1, low_open=True)  # (0, 1]: top_p and the like


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def join_negative_values(argv: Sequence[str], parser: argparse.ArgumentParser | None = None) -> list[str]:
    """`--flag -1e-3` -> `--flag=-1e-3` for every option that takes a value (or any `--flag` the parser
    does not know, when `parser` is None or it is unknown), so a negative number reaches the flag's range
    check. Stops at `--`."""
    out: list[str] = []
    i = 0
    argv = list(argv)
    while i < len(argv):
        token = argv[i]
        if token == "--":
            out.extend(argv[i:])
            break
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if (token.startswith("--") and "=" not in token and nxt is not None and nxt.startswith("-")
                and _is_number(nxt) and _takes_value(parser, token)):
            out.append(f"{token}={nxt}")
            i += 2
            continue
        out.append(token)
        i += 1
    return out


def _takes_value(parser: argparse.ArgumentParser | None, option: str) -> bool:
    if parser is None:
        return True
    action = parser._option_string_actions.get(option)  # noqa: SLF001 - argparse keeps no public map
    if action is None:
        return True  # unknown: the caller's own error names it
    return action.nargs != 0


def check_output_path(path: str | os.PathLike | None, flag: str = "--output_dir") -> None:
    """An output folder that exists as a folder, or can be created: refuse (naming the flag and what to
    change) a path that is a file, lies under a file, or whose nearest existing folder is not writable.
    Creates nothing."""
    if path is None or str(path) == "":
        return
    target = Path(path).expanduser()
    if target.exists() and not target.is_dir():
        raise ValueError(f"{flag} {str(path)!r} is a file, not a folder: choose a folder path (or move the file)")
    parent = target
    while not parent.exists():
        if parent.parent == parent:
            break
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise ValueError(f"{flag} {str(path)!r} cannot be created: {str(parent)!r} is a file, not a folder; "
                         f"choose another path")
    if parent.exists() and not os.access(parent, os.W_OK | os.X_OK):
        what = "is not writable" if parent == target else f"cannot be created: {str(parent)!r} is not writable"
        raise ValueError(f"{flag} {str(path)!r} {what} by this user; choose a folder you can write to "
                         f"(or fix its permissions)")
