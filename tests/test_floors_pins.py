"""The floors scripts/test_floors.sh tests are the floors pyproject.toml promises: every direct dependency's
lower bound is pinned, at that exact version, in constraints-floors.txt (trl, of the [test] extra, in
constraints-floors-trl.txt), and the pins both stages share agree."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def pins(name: str) -> dict[str, Version]:
    out = {}
    for line in (ROOT / name).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            match = re.fullmatch(r"([A-Za-z0-9_.-]+)==([^\s;]+)", line)
            assert match, f"{name}: {line!r} is not an exact pin"
            out[canonicalize_name(match[1])] = Version(match[2])
    return out


def floors(requirements: list[str]) -> dict[str, Version]:
    out = {}
    for text in requirements:
        req = Requirement(text)
        lower = [Version(s.version) for s in req.specifier if s.operator == ">="]
        assert len(lower) == 1, f"pyproject.toml: {text!r} has no single lower bound (>=) to test"
        out[canonicalize_name(req.name)] = lower[0]
    return out


def test_every_dependency_floor_is_the_pinned_floor():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core, trl = pins("constraints-floors.txt"), pins("constraints-floors-trl.txt")
    for name, floor in floors(project["dependencies"]).items():
        assert name in core, f"{name}>={floor} is not pinned in constraints-floors.txt"
        assert core[name] == floor, f"pyproject.toml says {name}>={floor}, constraints-floors.txt tests {core[name]}"
    test_trl = floors([d for d in project["optional-dependencies"]["test"] if Requirement(d).name == "trl"])
    assert trl["trl"] == test_trl["trl"], f"the [test] extra says trl>={test_trl['trl']}, the floors test {trl['trl']}"
    for name, version in trl.items():  # stage trl keeps qtarget's own floors
        if name in core:
            assert version == core[name], f"constraints-floors-trl.txt pins {name}=={version}, " \
                                          f"constraints-floors.txt {core[name]}"


def test_the_development_pins_lie_inside_the_promised_range():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    ranges = {canonicalize_name(Requirement(d).name): Requirement(d).specifier for d in project["dependencies"]}
    for name, version in pins("constraints.txt").items():
        if name in ranges:
            assert version in ranges[name], f"constraints.txt pins {name}=={version}, outside {ranges[name]}"
