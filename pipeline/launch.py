"""How the project's entry points are started outside `make`: what a project directory is, and the
environment the Makefile exports, so `cxr-refine` and the Python API run stages the way `make` does.

Standard library only: the command line imports it before anything heavy.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

# what the Makefile exports for every command (offline, no analytics, a patient temporary Prefect server)
MAKE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "GRADIO_ANALYTICS_ENABLED": "False",
    "DVC_NO_ANALYTICS": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300",
    "PYTHONUNBUFFERED": "1",
}
PROJECT_FILES = ("params.yaml", "dvc.yaml")


class NotAProject(RuntimeError):
    """The directory holds no params.yaml and dvc.yaml; the message is one line that says what to do."""


def require_project(root: str | os.PathLike = ".") -> Path:
    """`root`, resolved, if it holds the pipeline (params.yaml and dvc.yaml), else NotAProject."""
    root = Path(root).resolve()
    missing = [name for name in PROJECT_FILES if not (root / name).is_file()]
    if missing:
        raise NotAProject(f"{root} is not a cxr-refine project (no {' or '.join(missing)}): run it in the "
                          "directory of a clone of the repository, or pass -C DIR")
    return root


def child_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """`base` (default os.environ) with the Makefile's defaults where unset, and this interpreter's bin
    directory first on PATH: dvc.yaml's `python -m pipeline.stages...` and `dvc` then mean this install."""
    env = dict(os.environ if base is None else base)
    for key, value in MAKE_ENV.items():
        env.setdefault(key, value)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), *filter(None, [env.get("PATH")])])
    return env
