"""`qtarget inspect` and `qtarget objectives` through the real CLI entry point."""
from __future__ import annotations

import json

import torch

import qtarget
from qtarget.cli import main
from qtarget.inspect_cmd import example_position


def test_inspect_numbers_are_the_implied_targets(tmp_path, capsys):
    out_json, out_png = tmp_path / "q.json", tmp_path / "q.png"
    rc = main(["inspect", "dft", "target_sft", "label_smoothing", "--eta", "0.25", "--lam", "0.3", "--seed", "3",
               "--json", str(out_json), "--plot", str(out_png)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "target_sft(eta=0.25)" in text and "label_smoothing(lam=0.3)" in text
    result = json.loads(out_json.read_text())
    z, y, aux = example_position(12, 3, None)
    assert result["label"] == int(y[0])
    for row, obj in zip(result["rows"], [qtarget.get_objective("dft"), qtarget.get_objective("target_sft", eta=0.25),
                                          qtarget.get_objective("label_smoothing", lam=0.3)]):
        want = qtarget.implied_target(obj, z, y, **aux)[0]
        torch.testing.assert_close(torch.tensor(row["Q"]), want, rtol=1e-5, atol=1e-6)
    # label smoothing: gamma = 1 - lam and the residual is uniform
    ls = result["rows"][2]
    assert abs(ls["gamma"] - 0.7) < 1e-6
    assert all(abs(q - 1 / 12) < 1e-5 for _, q in ls["residual_top"])
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_inspect_whole_catalogue_and_errors(capsys):
    assert main(["inspect"]) == 0
    text = capsys.readouterr().out
    for name in qtarget.list_objectives():
        assert f"\n{name}(" in text or text.startswith(f"{name}(")
    assert main(["inspect", "dtf"]) == 2
    assert "unknown objective 'dtf'" in capsys.readouterr().err
    assert main(["objectives"]) == 0
    listing = capsys.readouterr().out
    assert "target_sft" in listing and "needs: teacher" in listing


def test_cli_help_and_unknown_command(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for cmd in ("lab", "train", "eval", "inspect"):
        assert f"  {cmd} " in text
    assert main(["trian"]) == 2
    assert "did you mean: train" in capsys.readouterr().err.lower()
