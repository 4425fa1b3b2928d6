"""Shared fixtures: offline settings, a Prefect test harness, and a tiny params file."""
from __future__ import annotations

import functools
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.compute import available_cores
from pipeline.config import real_data_dir
from tests.helpers import ROOT  # re-exported: modules import it from here

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("CXR_LOG_LEVEL", "WARNING")
# dvc stages run `python -m ...`: make that this interpreter
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"

# Torch threads for this test process and for the stages it runs (tiny_params' compute.threads): the
# cores shared out among pytest-xdist's workers, so that `make test`'s two workers do not run four
# threads on two cores. CXR_TEST_THREADS overrides it.
TEST_THREADS = int(os.environ.get("CXR_TEST_THREADS") or
                   max(1, available_cores() // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)))
torch.set_num_threads(TEST_THREADS)


def tiny_params() -> dict:
    """The default params, shrunk so a whole 2-cycle run takes well under a minute."""
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    p["data"].update(image_size=64, shard_size=64)
    p["phantom"].update(n_patients=90)
    p["segment"].update(n_train=48, epochs=3, size=32, batch_size=8)  # 18 steps: masks that pass the anatomy checks
    # a resume point every 2 steps: a kill at the first one lands mid-epoch (tests/test_crash_consistency.py)
    p["train"].update(epochs=2, finetune_epochs=1, batch_size=32, checkpoint_every_steps=2)
    p["evaluate"].update(n_cam_images=24, n_sanity_images=4, n_faithfulness_images=4)
    p["report"].update(grid_images=3)
    # the stop rule never fires: tiny models are noisy, and the flow and `dvc repro` must run the same
    # cycles for the determinism test to compare them (tests/test_cycle_control.py tests the rule)
    p["flow"].update(auroc_tolerance=1.0, patience=10)
    p["compute"]["threads"] = TEST_THREADS
    p["engine"] = {"kind": "local"}  # a LocalCluster per stage costs ~4 s; tests/test_engine.py runs Dask
    p["cycles"] = {"c1": {"id": 1, "prev": 0}, "c2": {"id": 2, "prev": 1}}
    return p


def link_jsrt(jsrt: Path, dest: Path, n: int) -> Path:
    """`n` JSRT films and their three SCR masks as links, in the download layout."""
    stems = sorted(p.stem for p in (jsrt / "images").glob("*.png"))[:: max(1, 247 // n)][:n]
    for stem in stems:
        for sub, name in [("images", f"{stem}.png")] + [(f"masks/{s}", f"{stem}.gif")
                                                        for s in ("heart", "left lung", "right lung")]:
            (dest / sub).mkdir(parents=True, exist_ok=True)
            (dest / sub / name).symlink_to(jsrt / sub / name)
    return dest


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The real radiographs; a test that needs them fails under CI (``CI`` set) when they are missing,
    and is skipped elsewhere."""
    root = real_data_dir()
    if not ((root / "kermany-224").is_dir() and (root / "jsrt-scr").is_dir()):
        message = f"real radiographs not found at {root} (set CXR_REAL_DATA; see README, Real datasets)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return root


# Debian's Chromium driven by Playwright (installed by .ci/run); Playwright's own download does not work here
CHROMIUM = os.environ.get("CXR_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run"]


@pytest.fixture(scope="module")
def browser():
    if not (shutil.which(CHROMIUM) or Path(CHROMIUM).is_file()):
        msg = f"{CHROMIUM} not found: `apt-get install -y chromium` (.ci/run does)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect_home"))
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness():
        yield


@pytest.fixture(scope="module")
def hypothesis_home(tmp_path_factory):
    """For the modules that run hypothesis (tests/test_fuzz_*.py): no example database is kept
    (database=None in tests/fuzz_support._settings), but hypothesis also caches the constants it
    finds in local modules under its home directory, by default ./.hypothesis: keep that out of the
    repository."""
    from hypothesis.configuration import set_hypothesis_home_dir

    set_hypothesis_home_dir(tmp_path_factory.mktemp("hypothesis-home"))
    yield
    set_hypothesis_home_dir(None)


@pytest.fixture
def params_file(tmp_path) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    return path


# Seconds each module took in `make test` (`--durations=0`, both cores busy, 2026-12-05; test_sources_e2e
# is NIH's cycle alone since Kermany's went slow; test_determinism's includes building the shared project
# and the flow run test_flow_watch reads): the order in which the modules are handed to the two
# workers, heaviest first, so that no long module starts last. It changes when a test runs, never what
# it checks; a module not listed here goes after these.
_MODULE_SECONDS = {
    "test_determinism": 400, "test_end_to_end": 235, "test_real_data": 208, "test_sources_e2e": 111,
    "test_viewer_api": 164, "test_review_api": 152, "test_viewer_attacks": 132,
    "test_cam": 111, "test_ddp": 102, "test_engine": 100, "test_models": 91, "test_feedback_cycle": 82,
    "test_crash_consistency": 71, "test_cli": 56, "test_kill_resume": 43, "test_benchmarks": 50,
}


# modules that read the session's tiny 2-cycle project (tests/viewer_support.py trained_project), or
# the viewer that serves it (running_viewer)
_SHARED_PROJECT = ("trained_project", "reference_project", "repro_project", "running_viewer",
                   "clean_checkout_flow_run")


@functools.cache
def _reads_shared_project(path: Path) -> bool:
    return any(name in path.read_text(errors="replace") for name in _SHARED_PROJECT)


def pytest_configure(config):
    """A folder every xdist worker of this run sees, made by the controller before the workers start
    (they inherit the environment): the tiny project is built there once and each worker copies it
    (tests/viewer_support.trained_project), so the modules that read it can go to either worker."""
    if not hasattr(config, "workerinput") and "CXR_TEST_SHARED" not in os.environ:
        config._cxr_shared = tempfile.mkdtemp(prefix="cxr-tests-shared-")
        os.environ["CXR_TEST_SHARED"] = config._cxr_shared


def pytest_unconfigure(config):
    shared = getattr(config, "_cxr_shared", None)
    if shared:
        shutil.rmtree(shared, ignore_errors=True)
        os.environ.pop("CXR_TEST_SHARED", None)


# modules that read one session-cached run (tests/pipeline_runs.clean_checkout_flow_run: the determinism
# test's flow run is the one flow_watch watches, through the worker's own Prefect server) go to the same
# worker, or each worker would make that run (250-350 s) for itself
_SAME_WORKER_AS = {"tests/test_flow_watch.py": "tests/test_determinism.py"}


def pytest_xdist_make_scheduler(config, log):
    """`make test` runs `-n 2 --dist loadscope --no-loadscope-reorder`: a module goes whole to one
    worker (its module fixtures built once), in collection order (`pytest_collection_modifyitems`),
    and the modules of `_SAME_WORKER_AS` go together."""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class Modules(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return _SAME_WORKER_AS.get(module, module)

    return Modules(config, log)


def pytest_collection_modifyitems(config, items):
    """Heaviest module first (file order within a module), in every worker alike: with `--dist loadscope
    --no-loadscope-reorder` the order in which modules go to the two workers. The second is the heaviest
    module that does not read the shared project, so that the other worker does not wait while the first
    builds it."""
    modules = list(dict.fromkeys(Path(item.path) for item in items))  # collection order: the same in every worker
    order = sorted(modules, key=lambda path: -_MODULE_SECONDS.get(path.stem, 0))
    if len(order) > 2 and _reads_shared_project(order[0]) and _reads_shared_project(order[1]):
        second = next((path for path in order if not _reads_shared_project(path)), None)
        if second is not None:
            order.remove(second)
            order.insert(1, second)
    rank = {path: i for i, path in enumerate(order)}
    items.sort(key=lambda item: rank[Path(item.path)])


_busy: dict[str, float] = {}


def pytest_runtest_logreport(report):
    """Seconds each xdist worker spent in tests (setup, call, teardown), for the balance line below."""
    node = getattr(report, "node", None)  # set by xdist on the controller
    if node is not None:
        worker = node.gateway.id
        _busy[worker] = _busy.get(worker, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter):
    """`make test` is as long as its busiest worker: show each one's total, so an imbalance is seen at
    once."""
    if _busy:
        terminalreporter.write_line("busy seconds per worker: " + ", ".join(
            f"{w} {s:.0f}" for w, s in sorted(_busy.items())))
