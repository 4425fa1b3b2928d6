"""A Python outside requires-python stops at once with one line: importing the library, starting the
command, and `make`'s install rule before it creates a venv."""
from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib

import pytest
from packaging.specifiers import SpecifierSet

import pipeline
from tests.conftest import ROOT

PRETEND = "import sys; sys.version_info = ({}, {}, 0, 'final', 0); exec(sys.argv[1])"


def pretending(major: int, minor: int, code: str, cwd=ROOT) -> subprocess.CompletedProcess:
    """Run `code` in this interpreter as if it were Python major.minor."""
    return subprocess.run([sys.executable, "-c", PRETEND.format(major, minor), code], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_the_library_states_pyprojects_range():
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert SpecifierSet(requires) == SpecifierSet(pipeline.REQUIRES_PYTHON)


@pytest.mark.parametrize("version", [(3, 10), (3, 12), (3, 13)])
@pytest.mark.parametrize("code", ["import pipeline", "from pipeline.cli import main; main(['--help'])",
                                  "import pipeline.api"])
def test_an_unsupported_python_fails_in_one_line(version, code):
    proc = pretending(*version, code)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: cxr-refine needs Python >=3.11,<3.12"), \
        proc.stderr[-1000:]
    assert f"is {version[0]}.{version[1]}.0" in proc.stderr and not proc.stdout


def test_the_supported_python_imports():
    proc = pretending(3, 11, "import pipeline; print(pipeline.REQUIRES_PYTHON)")
    assert proc.returncode == 0 and proc.stdout.strip() == ">=3.11,<3.12", proc.stderr


def test_make_refuses_an_unsupported_python_before_creating_the_venv(tmp_path):
    """The install rule's first step, with a `python` that says it is 3.12 (no other is on this machine)."""
    if not shutil.which("make"):
        pytest.skip("make not installed")
    for name in ("Makefile", "pyproject.toml", "constraints.txt"):
        shutil.copy(ROOT / name, tmp_path / name)
    (tmp_path / "pipeline").mkdir()
    shutil.copy(ROOT / "pipeline" / "__init__.py", tmp_path / "pipeline" / "__init__.py")
    fake = tmp_path / "python3.12"
    fake.write_text(f'#!/bin/sh\n[ "$1" = -c ] || exit 99\nexec {sys.executable} -c "{PRETEND.format(3, 12)}" "$2"\n')
    fake.chmod(0o755)
    proc = subprocess.run(["make", "--no-print-directory", ".venv/.installed", f"PYTHON={fake}"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "error: cxr-refine needs Python >=3.11,<3.12" in proc.stderr and "is 3.12.0" in proc.stderr, proc.stderr
    assert not (tmp_path / ".venv").exists()
