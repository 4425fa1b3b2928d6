"""`cxr-refine`: every subcommand's help shows what it runs and that entry point's own options; the
command refuses a directory that is not a project in one line; options reach the entry point."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.cli import COMMANDS
from pipeline.presets import list_presets
from pipeline.viewer.auth import read_users_file, verify_password
from tests.conftest import ROOT
from tests.helpers import free_port

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


def test_viewer_options_reach_the_viewer_and_sigterm_reaches_it_through_the_command(tmp_path):
    """`--port` becomes the viewer's CXR_PORT; SIGTERM sent to `cxr-refine` (as a service manager sends
    it) stops the viewer, which cleans up and exits, and its status comes back."""
    import httpx
    import psutil

    project, port, log = project_dir(tmp_path), free_port(), tmp_path / "viewer.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CXR_USERS": "ann:a-long-password", "GRADIO_TEMP_DIR": str(tmp_path)}
    env.pop("CXR_PORT", None)
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "viewer", "--port", str(port)], cwd=project,
                                env=env, stdout=out, stderr=subprocess.STDOUT)
    viewer: list = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/api/v1/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        else:
            pytest.fail(f"no viewer on port {port}:\n{log.read_text()[-2000:]}")
        viewer = psutil.Process(proc.pid).children()
        assert len(viewer) == 1 and list(tmp_path.glob("cxr-viewer-*"))   # its private upload folder
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 128 + signal.SIGTERM, log.read_text()[-2000:]   # the viewer's status on SIGTERM
        viewer[0].wait(10)
        assert not list(tmp_path.glob("cxr-viewer-*"))   # removed on its way out: it was stopped, not killed
    finally:   # nothing outlives the test, whatever failed
        if proc.poll() is None:
            viewer += psutil.Process(proc.pid).children(recursive=True)
            proc.kill()
        for child in viewer:
            if child.is_running():
                child.kill()
        proc.wait(10)
