"""The `qtarget` dispatcher: one error line with the command's prefix and exit status 2 for bad input."""
from __future__ import annotations

import sys
import types

import pytest

from qtarget import cli


def test_user_error_is_one_line_with_exit_2(monkeypatch, capsys):
    module = types.ModuleType("qtarget_fake_cmd")

    def main(argv):
        raise ValueError(f"--rows must be > 0, got {argv[0]}")

    module.main = main
    monkeypatch.setitem(sys.modules, "qtarget_fake_cmd", module)
    monkeypatch.setitem(cli.SUBCOMMANDS, "fake", ("qtarget_fake_cmd", "a test command"))
    assert cli.main(["fake", "-3"]) == 2
    err = capsys.readouterr().err
    assert err == "qtarget fake: error: --rows must be > 0, got -3\n"


def test_unknown_command_suggests_the_closest(capsys):
    assert cli.main(["trian"]) == 2
    assert "Did you mean: train" in capsys.readouterr().err


def _fake_command(monkeypatch, error: BaseException) -> None:
    module = types.ModuleType("qtarget_fake_raise")

    def main(argv):
        raise error

    module.main = main
    monkeypatch.setitem(sys.modules, "qtarget_fake_raise", module)
    monkeypatch.setitem(cli.SUBCOMMANDS, "fake", ("qtarget_fake_raise", "a test command"))


def test_a_multi_line_library_message_becomes_one_line(monkeypatch, capsys):
    _fake_command(monkeypatch, OSError("We couldn't connect to the hub.\n  Check your connection.\n"))
    assert cli.main(["fake"]) == 2
    assert capsys.readouterr().err == "qtarget fake: error: We couldn't connect to the hub. Check your connection.\n"


def test_interrupt_is_a_line_with_exit_130_and_traceback_on_request(monkeypatch, capsys):
    _fake_command(monkeypatch, KeyboardInterrupt())
    assert cli.main(["fake"]) == 130
    assert capsys.readouterr().err.strip() == "qtarget fake: interrupted"
    _fake_command(monkeypatch, ValueError("bad --rows"))
    monkeypatch.setenv("QTARGET_TRACEBACK", "1")
    with pytest.raises(ValueError, match="bad --rows"):
        cli.main(["fake"])
