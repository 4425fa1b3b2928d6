"""Helpers that many test modules share: a fresh project to run the pipeline in, and a free port.

Fixtures stay in conftest.py; plain functions live here, so a module imports them by name.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
# who commits in a test's git repository (a clean machine has no git identity configured)
GIT_IDENTITY = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}


def make_project(dest: Path, params: dict) -> Path:
    """A fresh git + DVC project with this repo's code and the given params."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("pipeline", "flows"):
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", dest / "dvc.yaml")
    (dest / "data" / "raw").mkdir(parents=True)
    shutil.copy(ROOT / "data" / "raw" / "README.md", dest / "data" / "raw" / "README.md")
    (dest / "data" / "feedback").mkdir()
    shutil.copy(ROOT / "data" / "feedback" / "README.md", dest / "data" / "feedback" / "README.md")
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, **GIT_IDENTITY}
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"],
                [sys.executable, "-m", "dvc", "config", "core.analytics", "false"]):
        subprocess.run(cmd, cwd=dest, check=True, env=env, capture_output=True)
    shutil.copytree(ROOT / ".dvc" / "plots", dest / ".dvc" / "plots")  # the curves' plot template (dvc.yaml)
    for cmd in (["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        subprocess.run(cmd, cwd=dest, check=True, env=env, capture_output=True)
    return dest


def free_port() -> int:
    """A loopback TCP port nobody listens on now (for a server a test starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
