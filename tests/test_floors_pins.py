"""The floors scripts/test_floors.sh tests are the floors pyproject.toml promises, layer by layer: every lower
bound of the torch-only core is pinned, at that exact version, in constraints-floors-core.txt; the 'patch'
extra's in constraints-floors-patch.txt; the Hugging Face stack's ('hf' and 'plots' extras, sympy of 'eval') in
constraints-floors.txt (trl, of the [test] extra, in constraints-floors-trl.txt); and the pins two files share
agree."""
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


def extra(project: dict, name: str) -> list[str]:
    """An extra's requirements, without the references to other extras (qtarget[...])."""
    return [d for d in project["optional-dependencies"][name] if canonicalize_name(Requirement(d).name) != "qtarget"]


def layers(project: dict) -> dict[str, list[str]]:
    """floors file -> the requirements whose lower bounds it pins."""
    sympy = [d for d in extra(project, "eval") if Requirement(d).name == "sympy"]
    return {"constraints-floors-core.txt": project["dependencies"],
            "constraints-floors-patch.txt": extra(project, "patch"),
            "constraints-floors.txt": extra(project, "hf") + extra(project, "plots") + sympy}


def test_every_dependency_floor_is_the_pinned_floor():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for file, requirements in layers(project).items():
        pinned = pins(file)
        for name, floor in floors(requirements).items():
            assert name in pinned, f"{name}>={floor} is not pinned in {file}"
            assert pinned[name] == floor, f"pyproject.toml says {name}>={floor}, {file} tests {pinned[name]}"
    core, trl = pins("constraints-floors.txt"), pins("constraints-floors-trl.txt")
    test_trl = floors([d for d in project["optional-dependencies"]["test"] if Requirement(d).name == "trl"])
    assert trl["trl"] == test_trl["trl"], f"the [test] extra says trl>={test_trl['trl']}, the floors test {trl['trl']}"
    for name, version in trl.items():  # stage trl keeps qtarget's own floors
        if name in core:
            assert version == core[name], f"constraints-floors-trl.txt pins {name}=={version}, " \
                                          f"constraints-floors.txt {core[name]}"
    for name, version in pins("constraints-floors-core.txt").items():  # every stage installs the core's floors
        if name in core:
            assert version == core[name], f"constraints-floors-core.txt pins {name}=={version}, " \
                                          f"constraints-floors.txt {core[name]}"


def test_the_core_needs_torch_numpy_and_safetensors_alone():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert sorted(canonicalize_name(Requirement(d).name) for d in project["dependencies"]) == \
        ["numpy", "safetensors", "torch"]


def test_the_development_pins_lie_inside_the_promised_range():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + extra(project, "hf") + extra(project, "eval")
    ranges = {canonicalize_name(Requirement(d).name): Requirement(d).specifier for d in requirements}
    for name, version in pins("constraints.txt").items():
        if name in ranges:
            assert version in ranges[name], f"constraints.txt pins {name}=={version}, outside {ranges[name]}"
