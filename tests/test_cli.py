"""The `qtarget` dispatcher: one error line with the command's prefix and exit status 2 for bad input."""
from __future__ import annotations

import sys
import types

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
