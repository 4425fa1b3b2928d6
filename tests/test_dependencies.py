"""Every third-party package the code imports is declared in pyproject.toml (the library, flows and
benchmarks in `dependencies`, the tests in `dev` too), and constraints.txt pins each declared one to
the version installed here, inside its range."""
from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.conftest import ROOT

OURS = {"pipeline", "flows", "benchmarks", "tests", "examples"}
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
MAIN = [Requirement(r) for r in PROJECT["dependencies"]]
DEV = [Requirement(r) for r in PROJECT["optional-dependencies"]["dev"]]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def imported_modules(folder: Path) -> dict[str, set[str]]:
    """{top-level module: files importing it} for absolute imports that are neither stdlib nor ours."""
    found: dict[str, set[str]] = {}
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in OURS:
                    found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


@pytest.mark.parametrize("folders, declared", [(("pipeline", "flows", "benchmarks"), MAIN),
                                               (("tests", "examples"), MAIN + DEV)], ids=["code", "tests"])
def test_every_imported_package_is_declared(folders, declared):
    distributions = packages_distributions()
    names = {canonical(r.name) for r in declared}
    undeclared = {}
    for folder in folders:
        for module, files in imported_modules(ROOT / folder).items():
            dists = {canonical(d) for d in distributions.get(module, [])}
            assert dists, f"{module} (imported by {sorted(files)}) is not installed"
            if not dists & names:
                undeclared[module] = (sorted(dists), sorted(files))
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"


def test_the_finder_sees_what_was_missing():
    """The check above works on the packages this issue found undeclared (ruamel.yaml, starlette)."""
    found = imported_modules(ROOT / "pipeline")
    assert {"ruamel", "starlette", "torch"} <= set(found)
    assert "json" not in found and "pipeline" not in found


def constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, sep, pinned = line.partition("==")
            assert sep and pinned, f"constraints.txt: {line!r} is not an exact pin"
            assert canonical(name) not in pins, f"constraints.txt pins {name} twice"
            pins[canonical(name)] = pinned
    return pins


def test_constraints_pin_every_dependency_inside_its_range_at_the_installed_version():
    pins = constraints()
    for req in MAIN + DEV:
        name = canonical(req.name)
        assert name in pins, f"{req.name} is not pinned in constraints.txt"
        assert req.specifier.contains(pins[name]), f"constraints.txt: {req.name}=={pins[name]} outside {req}"
        assert version(req.name) == pins[name], f"{req.name} {version(req.name)} installed, {pins[name]} pinned"
    assert set(pins) == {canonical(r.name) for r in MAIN + DEV}, "constraints.txt pins a package not declared"


def test_dependencies_are_ranges_with_the_known_limits():
    by_name = {canonical(r.name): r.specifier for r in MAIN}
    assert not by_name["fastapi"].contains("0.155.0")        # prefect 3.8 breaks with it
    assert str(by_name["albumentations"]) == "==2.0.8"        # the last MIT release
    assert by_name["gradio"].contains("6.20.0")
    assert "opencv-python" not in by_name                      # headless only
    exact = [str(r) for r in MAIN if str(r.specifier).startswith("==") and r.name != "albumentations"]
    assert not exact, f"exact pins belong in constraints.txt: {exact}"
