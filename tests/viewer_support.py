"""Shared by the viewer's API and browser tests: one trained tiny project and one running viewer per
test session (module-level caches, so both test modules use the same ones), and upload bodies.

The viewer runs as a real server (`python -m pipeline.viewer` in a subprocess on a free loopback
port) and is spoken to over real HTTP.
"""
from __future__ import annotations

import atexit
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

try:
    import fcntl  # POSIX: the lock two xdist workers share; elsewhere each worker builds its own
except ImportError:
    fcntl = None

from tests.conftest import ROOT, tiny_params
from tests.helpers import free_port, make_project

USER, PASSWORD = "clinician", "test-password-1"
_cache: dict = {}


def _tmp_root() -> Path:
    if "tmp" not in _cache:
        _cache["tmp"] = Path(tempfile.mkdtemp(prefix="cxr-viewer-test-"))
        atexit.register(shutil.rmtree, _cache["tmp"], ignore_errors=True)
    return _cache["tmp"]


def trained_project() -> Path:
    """The session's tiny project (phantom, 64 px, cycle 0 and two refinement cycles: tiny_params) run
    through `dvc repro` once per `make test` (`_built_once`), and copied for this worker: yours to read
    (viewer, crash, determinism, remote, end-to-end tests); a test that changes more than which cycle is
    served (serve_cycle) copies it first."""
    if "project" not in _cache and os.environ.get("CXR_VIEWER_TEST_PROJECT"):  # a dev shortcut: reuse one
        _cache["project"] = Path(os.environ["CXR_VIEWER_TEST_PROJECT"])
    if "project" not in _cache:
        shared = os.environ.get("CXR_TEST_SHARED")  # tests/conftest.py pytest_configure
        if shared and fcntl is not None:
            dest = _tmp_root() / "project"
            shutil.copytree(_built_once(Path(shared)), dest, symlinks=True)
        else:
            dest = _build(_tmp_root() / "project")
        _cache["project"] = dest
    return _cache["project"]


def _build(dest: Path) -> Path:
    params = tiny_params()
    # every core, as users run: tests/test_determinism.py reruns it under OMP_NUM_THREADS=1, which
    # must change nothing only because each stage sets its own threads
    params["compute"]["threads"] = 0
    make_project(dest, params)
    env = {**os.environ, "CXR_LOG_LEVEL": "WARNING"}
    subprocess.run([sys.executable, "-m", "dvc", "repro", "-q"], cwd=dest, check=True, env=env,
                   capture_output=True, timeout=900)
    assert (dest / "models" / "latest.json").is_file()
    return dest


def _built_once(shared: Path) -> Path:
    """The project under the run's shared folder, built by whichever xdist worker asks first while the
    other waits on the lock (~150 s); never changed after, so copying it needs no lock."""
    built, done = shared / "project", shared / "project.built"
    with open(shared / "project.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(built, ignore_errors=True)  # what a failed build in another worker left
            _build(built)
            done.touch()
    return built


def serve_cycle(project: Path, cycle: int) -> None:
    """Point models/latest.json at cycle `cycle`: the stop rule may serve cycle 0 on a tiny run (cycle 1
    localising worse), and tests of a model swap need two different served models whatever it chose."""
    latest = project / "models" / "latest.json"
    info = json.loads(latest.read_text())
    latest.write_text(json.dumps({**info, "cycle": cycle, "checkpoint": f"models/c{cycle}"}))


@dataclass
class Viewer:
    url: str
    root: Path
    temp_dir: Path
    log: Path
    proc: subprocess.Popen

    @property
    def auth(self) -> tuple[str, str]:
        return USER, PASSWORD

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def start_viewer(root: Path, name: str, extra_env: dict | None = None, timeout: float = 120,
                 default_limits: bool = False) -> Viewer:
    """A viewer subprocess; small upload and pixel limits (2 MB, 4 Mpixel) unless `default_limits`, which
    runs it at the limits users get (every CXR_* limit variable unset)."""
    import httpx

    port = free_port()
    temp_dir = _tmp_root() / f"gradio-{name}"
    temp_dir.mkdir()
    log = _tmp_root() / f"viewer-{name}.log"
    env = {**os.environ, "CXR_ROOT": str(root), "CXR_HOST": "127.0.0.1", "CXR_PORT": str(port),
           "CXR_USERS": f"{USER}:{PASSWORD}", "GRADIO_TEMP_DIR": str(temp_dir), "CXR_LOG_LEVEL": "INFO",
           "CXR_MAX_UPLOAD_MB": "2", "CXR_MAX_PIXELS": "4000000", **(extra_env or {})}
    env.pop("CXR_USERS_FILE", None)
    if default_limits:
        from pipeline.viewer.limits import __doc__ as limits_doc

        for var in set(re.findall(r"\bCXR_[A-Z_]+\b", limits_doc)) - set(extra_env or {}):
            env.pop(var, None)
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.viewer"], cwd=ROOT, env=env, stdout=fh,
                                stderr=subprocess.STDOUT)
    viewer = Viewer(f"http://127.0.0.1:{port}", root, temp_dir, log, proc)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"viewer exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(viewer.url + "/api/v1/health", timeout=2).status_code == 200:
                atexit.register(viewer.stop)
                return viewer
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    viewer.stop()
    raise RuntimeError(f"viewer did not come up in {timeout} s:\n{log.read_text()[-3000:]}")


def running_viewer() -> Viewer:
    """The session's viewer over the trained project (started once, stopped at exit)."""
    if "viewer" not in _cache or _cache["viewer"].proc.poll() is not None:
        _cache["viewer"] = start_viewer(trained_project(), "main")
    return _cache["viewer"]


def untrained_project() -> Path:
    """A project with params but no model at all."""
    if "untrained" not in _cache:
        dest = _tmp_root() / "untrained"
        dest.mkdir()
        (dest / "params.yaml").write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
        _cache["untrained"] = dest
    return _cache["untrained"]


# -- upload bodies ---------------------------------------------------------------------------------

def film(size: int = 200, seed: int = 3, findings: dict | None = None) -> np.ndarray:
    from tests.fixtures.images import radiograph

    return radiograph(np.random.default_rng(seed), size, findings or {"Cardiomegaly": True})


def png(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def jpeg(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def dicom(img: np.ndarray, monochrome1: bool = False, patient_id: str = "PID-8842-SECRET",
          patient_name: str = "ZEBEDEE^MARGARETHE") -> bytes:
    from tests.fixtures.images import write_dicom

    path = _tmp_root() / f"twin-{monochrome1}-{time.monotonic_ns()}.dcm"
    write_dicom(path, img, patient_id=patient_id, patient_name=patient_name, monochrome1=monochrome1)
    data = path.read_bytes()
    path.unlink()
    return data


def bad_files() -> dict[str, bytes]:
    """Every file the viewer must refuse with a clear message (from tests/fixtures/bad_files.py)."""
    from tests.fixtures import bad_files as bf

    good = dicom(film(64))
    return {
        "text": b"<html><body>403 Forbidden</body></html>\n",
        "random bytes": bf.random_bytes(),
        "truncated png": bf.truncated(png(film(64))),
        "truncated dicom": bf.truncated(good, 0.6),
        "png bomb": bf.png_bomb(),
        "dicom bomb": bf.dicom_bomb(),
        "multi-frame dicom": bf.multiframe_dicom(),
        "dicom without pixel data": bf.dicom_without_pixels(patient_id=bf.PHI_ID, patient_name=bf.PHI_NAME),
        "too many pixels": png(np.zeros((2100, 2100), np.uint8)),   # over CXR_MAX_PIXELS = 4e6
    }
