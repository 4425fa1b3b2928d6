"""A whole 2-cycle run on a tiny phantom, through `dvc repro` and through the Prefect flow."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import pandas as pd
import pytest
import yaml

from pipeline.scores import CycleScores
from tests.conftest import ROOT, tiny_params
from tests.helpers import free_port, make_project


def dvc(project, *args, check=True):
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, capture_output=True, text=True,
                          check=check)


@pytest.fixture(scope="module")
def repro_project():
    """The session's tiny 2-cycle `dvc repro` (built once, shared with the viewer and reliability tests)."""
    from tests.viewer_support import trained_project

    return trained_project()


def test_outputs_and_summary_schema(repro_project):
    p = repro_project
    summary = json.loads((p / "reports" / "summary.json").read_text())
    assert summary["dataset"] == "phantom"
    assert summary["labels"] == ["Cardiomegaly", "Lung Lesion", "Pneumonia", "Pleural Effusion"]
    assert [c["cycle"] for c in summary["cycles"]] == [0, 1, 2]
    for c in summary["cycles"]:
        assert set(CycleScores.SUMMARY) <= set(c)
        assert 0.0 <= c["auroc_macro"] <= 1.0 and 0.0 <= c["accuracy"] <= 1.0
        assert c["shortcut_gap"] == pytest.approx(c["accuracy"] - c["accuracy_shifted"])
        assert c["pointing_game"] is not None and c["sanity_rank_corr"] is not None
        assert set(c["per_label"]) == set(summary["labels"])
    assert summary["stop_reason"]
    latest = json.loads((p / "models" / "latest.json").read_text())
    assert (p / latest["checkpoint"]).is_file() and latest["cycle"] in (0, 1, 2)
    for k in (0, 1, 2):
        meta = json.loads((p / "models" / f"c{k}" / "model.json").read_text())
        assert meta["cycle"] == k and len(meta["thresholds"]) == 4
        assert (meta["parent"] or {}).get("cycle") == (k - 1 if k else None)
    assert (p / "reports" / "index.html").read_text().count("<img") >= 6
    sanity = json.loads((p / "reports" / "sanity.json").read_text())
    assert sanity["served_cycle"] == latest["cycle"] and summary["sanity"] == sanity
    assert sanity["cascading_randomization"]["final_rank_corr"] == summary["cycles"][latest["cycle"]]["sanity_rank_corr"]
    lp = sanity["label_permutation"]
    assert set(lp["by_cycle"]) == {"c0", "c1", "c2"} and lp["epochs"] == 2 and lp["passed"] in (True, False)
    assert "Saliency sanity checks" in (p / "reports" / "index.html").read_text()
    assert (p / "reports" / "figures" / "before_after.png").stat().st_size > 1000


def test_the_label_permutation_twin_is_a_dvc_output_checked_before_use(repro_project):
    """The twin lives in models/sanity_twin (DVC-tracked, so the cache and remotes carry it); the sanity
    stage refuses one trained for other params, and its figures are those of the twin's checkpoint."""
    from pipeline.config import Paths, load_params
    from pipeline.sanity_checks import load_twin

    p = repro_project
    assert "models/sanity_twin" in [o["path"] for o in yaml.safe_load((p / "dvc.lock").read_text())
                                    ["stages"]["sanity_twin"]["outs"]]
    assert not (p / "models" / ".resume" / "sanity_twin" / "state.safetensors").exists()  # done: DVC keeps it
    params, paths = load_params(p / "params.yaml"), Paths(p)
    labels = json.loads((p / "reports" / "summary.json").read_text())["labels"]
    twin, meta = load_twin(params, paths, labels, "cpu")
    lp = json.loads((p / "reports" / "sanity.json").read_text())["label_permutation"]
    assert lp["twin_val_loss"] == meta["twin"]["twin_val_loss"] and lp["epochs"] == meta["identity"]["epochs"] == 2
    other = params.model_copy(update={"sanity": params.sanity.model_copy(update={"seed": 1})})
    with pytest.raises(ValueError, match="trained for other params"):
        load_twin(other, paths, labels, "cpu")
    with pytest.raises(ValueError, match="trained for other params"):
        load_twin(params, paths, labels[::-1], "cpu")


def test_counterfactual_cycles_shrink_the_shortcut_gap(repro_project):
    """The project's main result, on a small phantom run: cycle 0 reads the planted markers (a clear gap
    between test and test_shifted), and the counterfactual cycles close most of it (measured on this
    set-up: about 0.3 at cycle 0, under 0.1 after)."""
    cycles = json.loads((repro_project / "reports" / "summary.json").read_text())["cycles"]
    gaps = [c["shortcut_gap"] for c in cycles]
    assert gaps[0] >= 0.15, gaps
    assert min(abs(g) for g in gaps[1:]) <= gaps[0] / 2, gaps


def test_manifest_contract(repro_project):
    m = pd.read_parquet(repro_project / "data" / "prepared" / "manifest.parquet")
    assert set(m["split"]) == {"train", "val", "test", "test_shifted"}
    assert m.groupby("patient_id")["split"].nunique().max() == 1
    assert m["No Finding"].isna().all() and m["Pneumonia"].notna().all()
    # the planted marker agrees with its label in test, disagrees in test_shifted
    for split, agree in (("test", True), ("test_shifted", False)):
        s = m[m["split"] == split]
        rate = (s["marker_Pneumonia"] == s["Pneumonia"]).mean()
        assert (rate > 0.75) if agree else (rate < 0.25)


def test_second_repro_runs_nothing_and_is_fast(repro_project):
    t = time.time()
    proc = dvc(repro_project, "repro")
    assert time.time() - t < 20
    assert "Running stage" not in proc.stdout
    status = dvc(repro_project, "status")
    assert "changed" not in status.stdout


@pytest.mark.slow
def test_enhance_param_reruns_only_downstream(repro_project, tmp_path):

    p = tmp_path / "p"
    shutil.copytree(repro_project, p, symlinks=True)
    params = yaml.safe_load((p / "params.yaml").read_text())
    params["enhance"]["feather"] = 2.0
    (p / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = dvc(p, "repro")
    ran = {line.split("'")[1] for line in proc.stdout.splitlines() if line.startswith("Running stage")}
    assert ran == {"enhance@c1", "train@c1", "evaluate@c1", "cam@c2", "enhance@c2", "train@c2",
                   "evaluate@c2", "sanity", "review_scores", "report"}, proc.stdout


def test_an_early_stop_skips_the_later_cycles_and_leaves_dvc_status_clean(repro_project, prefect_harness, tmp_path):
    """A stop rule that fires after cycle 1: `dvc repro` runs cycle 2's stages as placeholders, the
    report covers cycles 0-1 with the rule's reason, `dvc status` is clean, and the Prefect flow on the
    same project then agrees and runs nothing."""
    from flows.refine import refine

    p = tmp_path / "p"
    shutil.copytree(repro_project, p, symlinks=True)
    params = yaml.safe_load((p / "params.yaml").read_text())
    params["flow"].update(min_gain=1.0, patience=1)  # no cycle can gain 1.0: stop after cycle 1
    (p / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = dvc(p, "repro")
    ran = [line.split("'")[1] for line in proc.stdout.splitlines() if line.startswith("Running stage")]
    assert "train@c1" not in ran and {"cam@c2", "enhance@c2", "train@c2", "evaluate@c2", "report"} <= set(ran), ran
    stopped = json.loads((p / "reports" / "cycles" / "c2" / "metrics.json").read_text())
    assert stopped["cycle"] == 2 and "localisation gained less than 1.0" in stopped["stopped"]
    assert (p / "models" / "c2" / "stopped.json").is_file() and not (p / "models" / "c2" / "model.safetensors").exists()
    summary = json.loads((p / "reports" / "summary.json").read_text())
    assert [c["cycle"] for c in summary["cycles"]] == [0, 1] and summary["stop_reason"] == stopped["stopped"]
    assert json.loads((p / "models" / "latest.json").read_text())["cycle"] in (0, 1)
    assert set(json.loads((p / "reports" / "sanity.json").read_text())["label_permutation"]["by_cycle"]) == {"c0", "c1"}
    status = dvc(p, "status", "--json")
    assert json.loads(status.stdout) == {}, status.stdout
    lock = (p / "dvc.lock").read_text()
    result = refine(root=str(p))
    assert [c["cycle"] for c in result["cycles"]] == [0, 1] and result["stop_reason"] == stopped["stopped"]
    assert (p / "dvc.lock").read_text() == lock and json.loads(dvc(p, "status", "--json").stdout) == {}


def test_metrics_show_lists_headline_scores_per_cycle(repro_project):
    proc = dvc(repro_project, "metrics", "show", "--json")
    files = next(iter(json.loads(proc.stdout).values()))["data"]
    c2 = files["reports/cycles/c2/metrics.json"]["data"]
    assert set(c2) == {*CycleScores.SUMMARY, "auroc_shifted"} and c2["cycle"] == 2   # no audit: no marker figures
    summary = json.loads((repro_project / "reports" / "summary.json").read_text())
    assert c2["accuracy_shifted"] == summary["cycles"][2]["accuracy_shifted"]
    assert "reports/segment/metrics.json" in files


def test_flow_fails_fast_on_bad_params(prefect_harness, tmp_path):
    from flows.refine import refine
    from pipeline.config import ConfigError

    params = tiny_params()
    params["train"]["arch"] = "nope"
    project = make_project(tmp_path / "bad", params)
    with pytest.raises(ConfigError, match="train.arch"):
        refine(root=str(project))
    assert not (project / "data" / "prepared").exists()


def test_flow_against_a_running_prefect_server(repro_project, tmp_path):
    """`prefect server start`, then `python -m flows.refine` with PREFECT_API_URL: the run is recorded."""
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_API_URL": api}
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{api}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                assert server.poll() is None and time.time() < deadline, "prefect server did not start"
                time.sleep(1)
        proc = subprocess.run([sys.executable, "-m", "flows.refine", "--root", str(repro_project)], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        req = urllib.request.Request(f"{api}/flow_runs/filter", data=b"{}", method="POST",
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            runs = json.load(r)
        assert [(run["state_type"], run["parameters"]["root"]) for run in runs] == [("COMPLETED", str(repro_project))]
        req = urllib.request.Request(f"{api}/task_runs/count", data=b"{}", method="POST",
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            n_tasks = json.load(r)
        n_cycles = len(yaml.safe_load((repro_project / "params.yaml").read_text())["cycles"])
        # 5 set-up stages (audit included), 4 per cycle, the twin, sanity, review_scores, report
        assert n_tasks == 5 + 4 * n_cycles + 4
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


@pytest.mark.parametrize("policies", [["counterfactual"],
                                      pytest.param(["counterfactual", "overlay"], marks=pytest.mark.slow)])
def test_compare_policies_with_dvc_experiments(repro_project, prefect_harness, policies):
    """`dvc exp run --temp` per policy: the workspace is untouched, unaffected stages come from the
    run-cache, and the default policy's experiment reproduces the workspace's own scores. The quick
    variant runs the default policy alone (every stage from the run-cache); the slow one adds overlay."""
    from flows.compare import compare_policies

    p = repro_project
    before = (p / "reports" / "summary.json").read_text()
    summary = compare_policies(root=str(p), policies=policies)
    assert (p / "reports" / "summary.json").read_text() == before
    workspace = [json.loads((p / "reports" / "cycles" / f"c{k}" / "metrics.json").read_text()) for k in (0, 1, 2)]
    cf = summary["policies"]["counterfactual"]["cycles"]
    assert cf == workspace
    if "overlay" in policies:
        ov = summary["policies"]["overlay"]["cycles"]
        assert ov[0] == workspace[0] and [c["cycle"] for c in ov] == [0, 1, 2]
        assert ov[1]["accuracy_shifted"] != cf[1]["accuracy_shifted"] or ov[1]["pointing_game"] != cf[1]["pointing_game"]
        assert "policy-overlay" in dvc(p, "exp", "list", "--name-only").stdout
    saved = json.loads((p / "reports" / "policies" / "summary.json").read_text())
    assert saved == summary and (p / "reports" / "policies" / "comparison.png").stat().st_size > 1000
    assert "policy-counterfactual" in dvc(p, "exp", "list", "--name-only").stdout