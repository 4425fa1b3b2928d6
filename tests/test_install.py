"""`pip install .` into a fresh venv outside the repository gives a working `cxr-refine`.

A full install downloads about 5 GB, so the venv sees this environment's third-party packages through
a .pth line (after its own site-packages, whose copy of cxr-refine therefore wins) and the package is
installed with --no-deps. `--system-site-packages` would not do: it exposes the base interpreter's
packages, not this venv's. Lines of a .pth file are plain paths, so the .pth files inside this venv's
site-packages, among them the checkout's editable install, are not run there.
"""
from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def test_pip_install_outside_the_repository_gives_the_command(tmp_path):
    src = tmp_path / "src"   # what `pip install .` builds from, copied so the build writes nothing into the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    for package in ("pipeline", "flows", "benchmarks"):
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python, bin_dir = venv / "bin" / "python", venv / "bin"
    venv_site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                    check=True, capture_output=True, text=True).stdout.strip())
    (venv_site / "the-project-environment.pth").write_text("\n".join(site.getsitepackages()) + "\n")

    elsewhere = tmp_path / "elsewhere"   # no checkout on the path: only the installed package can answer
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = os.pathsep.join([str(bin_dir), "/usr/bin", "/bin"])
    run = lambda *cmd, **kw: subprocess.run([str(c) for c in cmd], cwd=elsewhere, env=env, capture_output=True,  # noqa: E731
                                            text=True, timeout=300, **kw)

    proc = run(python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index", src)
    assert proc.returncode == 0, proc.stderr[-3000:]
    installed = run(python, "-c", "import pipeline, flows, benchmarks; print(pipeline.__file__, flows.__file__, "
                                  "benchmarks.__file__, sep='\\n')")
    assert installed.returncode == 0, installed.stderr
    for path in installed.stdout.split():
        assert Path(path).is_relative_to(venv_site), path
    assert (venv_site / "pipeline" / "viewer" / "example_films" / "truth.json").is_file()
    assert any(venv_site.glob("cxr_refine-*.dist-info/licenses/LICENSE"))

    command = bin_dir / "cxr-refine"
    top = run(command, "--help")
    assert top.returncode == 0, top.stderr
    assert all(f"\n  {name} " in top.stdout for name in ("run", "repro", "viewer", "users")), top.stdout
    flow = run(command, "run", "--help")
    assert flow.returncode == 0, flow.stderr[-3000:]
    assert "python -m flows.refine" in flow.stdout and "--dask-address" in flow.stdout

    project = elsewhere / "project"   # a project without the code: the installed entry point runs
    project.mkdir()
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(ROOT / name, project / name)
    users = run(command, "-C", project, "users", "add", "alice", "--password-stdin", input="a-long-password\n")
    assert users.returncode == 0, users.stderr
    assert "alice" in (project / ".cxr" / "users.json").read_text()
    outside = run(command, "repro")
    assert outside.returncode != 0 and outside.stderr.count("\n") == 1, outside.stderr
