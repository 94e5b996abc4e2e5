"""`qtarget` command line: a thin dispatcher to each subcommand's own module.

Each subcommand module exposes `main(argv: list[str]) -> int` and builds its own parser, so
importing the CLI stays cheap and every subcommand documents its own flags (`qtarget train --help`).
"""
from __future__ import annotations

import argparse
import difflib
import importlib
import os
import sys

from qtarget import __version__
from qtarget.cli_args import join_negative_values
from qtarget.extras import missing_extra_hint

try:  # the torch-only core has no YAML reader (the 'hf' extra brings one)
    from yaml import YAMLError
except ImportError:
    YAMLError = ValueError

# Exceptions that mean "the input is wrong" (their messages name the argument, field or row): a bad
# value, a missing file, a folder or hub id that cannot be read (OSError, ConnectionError included),
# a YAML file that does not parse. QTARGET_TRACEBACK=1 shows the traceback instead.
USER_ERRORS = (ValueError, OSError, YAMLError)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are ValueErrors, so `main` prints them as one line (exit 2) like
    every other bad input, instead of a usage block."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        raise ValueError(f"{message} (`{self.prog} --help` lists the options)")

    def format_help(self) -> str:
        essentials_first(self)
        return super().format_help()

    def parse_known_args(self, args=None, namespace=None):
        """`--flag -1e-3` reaches the flag (argparse alone takes `-1e-3` for an option): see cli_args."""
        args = sys.argv[1:] if args is None else args
        return super().parse_known_args(join_negative_values(args, self), namespace)


# the flags a first run needs, listed first by every command's --help (in this order)
ESSENTIAL = ("config", "model", "dataset", "objective", "objectives", "objective_args", "benchmarks", "teacher_model",
             "output_dir")
ESSENTIAL_TITLE = "start here: model, data, objective, output"


def essentials_first(parser: argparse.ArgumentParser) -> None:
    """Move the ESSENTIAL flags a parser has into one argument group shown first (after positionals)."""
    if getattr(parser, "_essentials_arranged", False):
        return
    parser._essentials_arranged = True
    chosen = [a for name in ESSENTIAL for a in parser._actions if a.dest == name and a.option_strings]
    if not chosen:
        return
    group = next((g for g in parser._action_groups if g.title == ESSENTIAL_TITLE), None)
    for other in parser._action_groups:
        if other is not group:
            other._group_actions[:] = [a for a in other._group_actions if a not in chosen]
    if group is None:
        group = parser.add_argument_group(ESSENTIAL_TITLE)
    rest = [a for a in group._group_actions if a not in chosen]
    group._group_actions[:] = chosen + rest
    parser._action_groups.remove(group)
    parser._action_groups.insert(1, group)  # after the positionals, before options


def one_line(error: BaseException) -> str:
    """An exception's message on one line (library messages often span several)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return " ".join(lines) or type(error).__name__

# name -> (module, one-line summary)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "lab": ("qtarget.lab.cli", "compare objectives on a real pretrained model on a CPU, in minutes"),
    "train": ("qtarget.training.cli", "fine-tune a Hugging Face causal LM with any objective"),
    "eval": ("qtarget.evaluation.cli", "evaluate reasoning answers (accuracy, avg@k, pass@k)"),
    "inspect": ("qtarget.inspect_cmd", "show p, the implied target Q, gamma and the residual per objective"),
    "objectives": ("qtarget.inspect_cmd:list_main", "list the objective catalogue and parameters"),
    "teacher-cache": ("qtarget.teacher_cache.cli", "run a teacher once and cache its top-k per supervised token"),
    "profile": ("qtarget.profile.cli", "the prior profile of a model on your data and the objectives to try first"),
}

# the extra each command needs beyond the torch-only core (inspect and objectives need none; inspect's
# --plot needs 'plots', named by the missing module)
EXTRAS = {"lab": "lab", "train": "hf", "eval": "eval", "teacher-cache": "hf", "profile": "hf"}


def _usage() -> str:
    lines = ["usage: qtarget <command> [options]", "", "commands:"]
    for name, (_, summary) in SUBCOMMANDS.items():
        lines.append(f"  {name:<11} {summary}")
    lines += ["", "Run `qtarget <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(__version__)
        return 0
    name = argv[0]
    if name not in SUBCOMMANDS:
        close = difflib.get_close_matches(name, SUBCOMMANDS, n=3)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        print(f"qtarget: unknown command {name!r}.{hint}\n\n{_usage()}", file=sys.stderr)
        return 2
    target = SUBCOMMANDS[name][0]
    module_name, _, func = target.partition(":")
    try:
        module = importlib.import_module(module_name)
        return int(getattr(module, func or "main")(argv[1:]) or 0)
    except ImportError as e:  # an optional dependency is missing: name the extra that installs it
        hint = missing_extra_hint(e, EXTRAS.get(name))
        if hint is None or os.environ.get("QTARGET_TRACEBACK"):
            raise
        print(f"qtarget {name}: error: {hint}", file=sys.stderr)
        return 2
    except USER_ERRORS as e:  # bad input: one clear line, exit status 2 (no traceback)
        if os.environ.get("QTARGET_TRACEBACK"):
            raise
        print(f"qtarget {name}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: a line, not a traceback (finished checkpoints / batches are kept)
        if os.environ.get("QTARGET_TRACEBACK"):
            raise
        print(f"\nqtarget {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
