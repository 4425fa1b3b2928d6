"""`cxr-refine`: every subcommand's help shows what it runs and that entry point's own options; the
command refuses a directory that is not a project in one line; options reach the entry point."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import COMMANDS
from pipeline.presets import list_presets
from pipeline.viewer.auth import read_users_file, verify_password
from tests.conftest import ROOT

# an option each entry point's own parser defines: proof that --help reached it
OWN_OPTION = {"run": "--dask-address", "repro": "--force", "compare": "policies", "real": "--kermany",
              "viewer": "--port", "bench": "cam_dataset", "presets": "--data-root", "fresh-draw": "--patients",
              "users": "add"}


def cli(*args: str, cwd: Path, stdin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(ROOT)   # the checkout's pipeline, from any working directory
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, env=env, input=stdin,
                          capture_output=True, text=True, timeout=timeout)


def project_dir(path: Path) -> Path:
    (path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    (path / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text())
    return path


def test_the_top_level_help_lists_every_subcommand(tmp_path):
    proc = cli("--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for name in ("run", "repro", "compare", "viewer", "bench", "presets", "fresh-draw", "users"):
        assert f"\n  {name} " in proc.stdout, name


@pytest.mark.parametrize("name", sorted(OWN_OPTION))
def test_each_subcommand_help_describes_it_and_forwards_to_its_entry_point(name, tmp_path):
    assert set(OWN_OPTION) == set(COMMANDS)
    proc = cli(name, "--help", cwd=tmp_path)   # not a project: help needs none
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert COMMANDS[name].summary.split(" (")[0] in " ".join(proc.stdout.split()), proc.stdout[:500]
    assert OWN_OPTION[name] in proc.stdout
    assert "python -m" in proc.stdout   # says which entry point runs


@pytest.mark.parametrize("name", ["run", "repro", "presets", "users"])
def test_outside_a_project_the_command_fails_in_one_line(name, tmp_path):
    proc = cli(name, cwd=tmp_path)
    assert proc.returncode != 0
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: "), proc.stderr
    assert "not a cxr-refine project" in proc.stderr and "params.yaml" in proc.stderr
    assert not (tmp_path / ".git").exists()   # `run` touched nothing before the check


def test_a_missing_directory_after_dash_c_is_one_line(tmp_path):
    proc = cli("-C", str(tmp_path / "nowhere"), "presets", cwd=tmp_path)
    assert proc.returncode != 0 and proc.stderr.count("\n") == 1 and "no such directory" in proc.stderr


def test_presets_lists_the_presets_of_the_project(tmp_path):
    proc = cli("presets", cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == list_presets(ROOT)
    # the same from elsewhere with -C
    assert cli("-C", str(ROOT), "presets", cwd=tmp_path).stdout == proc.stdout


def test_users_add_writes_the_projects_users_file(tmp_path):
    project = project_dir(tmp_path)
    proc = cli("users", "add", "alice", "--password-stdin", cwd=project, stdin="a-long-password\n")
    assert proc.returncode == 0, proc.stderr
    users = read_users_file(project / ".cxr" / "users.json")
    assert set(users) == {"alice"} and verify_password("a-long-password", users["alice"])


def test_the_entry_points_exit_status_comes_back(tmp_path):
    project = project_dir(tmp_path)
    proc = cli("users", "add", "bob", "--password-stdin", cwd=project, stdin="short\n")
    assert proc.returncode == 1 and "at least 8 characters" in proc.stderr
    assert not (project / ".cxr" / "users.json").exists()
