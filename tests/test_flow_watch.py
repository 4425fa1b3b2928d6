"""Watching a run: the stages' output in the Prefect run log with their stage names, Dask at warnings
only, a markdown artifact per cycle and one for the table, runs named after dataset and policy."""
from __future__ import annotations

import logging
import re
import sys

import pytest

from flows.stage_log import StageOutput, run_logged
from tests.pipeline_runs import clean_checkout_flow_run


class Records(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)

    def lines(self) -> list[tuple[int, str]]:
        return [(r.levelno, r.getMessage()) for r in self.records]


def _output(stage="repro-target", progress_every=10.0):
    log = logging.getLogger("tests.flow_watch")
    log.propagate, log.level = False, logging.DEBUG
    handler = Records()
    log.handlers = [handler]
    clock = [0.0]
    return StageOutput(log, stage, progress_every, clock=lambda: clock[0]), handler, clock


def test_each_line_carries_the_stage_dvc_says_is_running():
    out, logged, _ = _output("train@c1")
    out.feed("Stage 'prepare' didn't change, skipping\nRunning stage 'cam@c1':\n> python -m pipeline.sta")
    out.feed("ges.cam\n2026-12-05 11:39:24,610 INFO pipeline.stages.cam: cycle 1: 64 CAMs\n")
    out.feed("Running stage 'train@c1':\n2026-12-05 11:40:01,002 WARNING pipeline.training: few positives\r\n")
    out.feed("WARNING: No file hash info found for 'reports/figures'. It won't be created.\n")
    out.feed("Traceback (most recent call last):\nlast line without a newline")
    out.close()
    assert logged.lines() == [
        (logging.INFO, "[train@c1] Stage 'prepare' didn't change, skipping"),  # before dvc names a stage
        (logging.INFO, "[cam@c1] Running stage 'cam@c1':"),
        (logging.INFO, "[cam@c1] > python -m pipeline.stages.cam"),          # a line split across chunks
        (logging.INFO, "[cam@c1] pipeline.stages.cam: cycle 1: 64 CAMs"),     # the stage's timestamp dropped
        (logging.INFO, "[train@c1] Running stage 'train@c1':"),
        (logging.WARNING, "[train@c1] pipeline.training: few positives"),    # its level kept
        (logging.WARNING, "[train@c1] WARNING: No file hash info found for 'reports/figures'. It won't be created."),
        (logging.INFO, "[train@c1] Traceback (most recent call last):"),
        (logging.INFO, "[train@c1] last line without a newline"),
    ]
    assert list(out.tail)[-2:] == ["Traceback (most recent call last):", "last line without a newline"]


def test_progress_redraws_reach_the_log_every_few_seconds_only():
    out, logged, clock = _output("segment", progress_every=10.0)
    for i in range(50):  # tqdm redraws its line with \r every mininterval; here one per simulated second
        clock[0] = float(i)
        out.feed(f"\rmasks: {2 * i:3d}%|#   | {i}/50 [00:{i:02d}<00:10]")
    out.feed("\r" + " " * 40 + "\r")  # leave=False: the bar clears its line
    out.feed("2026-12-05 11:39:24,610 INFO pipeline.stages.segment: U-Net scores\n")
    out.close()
    lines = [m for _, m in logged.lines()]
    assert lines == ["[segment] masks:   0%|#   | 0/50 [00:00<00:10]", "[segment] masks:  20%|#   | 10/50 [00:10<00:10]",
                     "[segment] masks:  40%|#   | 20/50 [00:20<00:10]", "[segment] masks:  60%|#   | 30/50 [00:30<00:10]",
                     "[segment] masks:  80%|#   | 40/50 [00:40<00:10]", "[segment] pipeline.stages.segment: U-Net scores"]
    assert list(out.tail) == ["2026-12-05 11:39:24,610 INFO pipeline.stages.segment: U-Net scores"]  # bars are no lines


def test_a_log_line_written_over_a_live_bar_is_still_a_line():
    out, logged, clock = _output("enhance@c1")
    out.feed("\renhance:  50%|#   | 32/64")
    clock[0] = 3.0
    out.feed("\renhance:  75%|#   | 48/64")  # within 10 s of the last one shown: not logged
    out.feed("2026-12-05 11:39:24,610 WARNING pipeline.enhance: a warning mid-loop\n")
    out.close()
    assert logged.lines() == [(logging.INFO, "[enhance@c1] enhance:  50%|#   | 32/64"),
                              (logging.WARNING, "[enhance@c1] pipeline.enhance: a warning mid-loop")]


def test_a_failed_command_raises_with_its_last_lines(tmp_path):
    log = logging.getLogger("tests.flow_watch.run")
    handler = Records()
    log.addHandler(handler)
    script = "import sys\nfor i in range(30): print('line', i)\nsys.stderr.write('boom\\n'); sys.exit(3)"
    with pytest.raises(RuntimeError, match=r"failed \(exit 3\):\nline 16\n(.|\n)*line 29\nboom$") as err:
        run_logged([sys.executable, "-c", script], tmp_path, {}, log, "evaluate@c1")
    assert "line 15" not in str(err.value)
    assert [m for _, m in handler.lines()][-2:] == ["[evaluate@c1] line 29", "[evaluate@c1] boom"]


def _distributed_level() -> int:
    return logging.getLogger("distributed").getEffectiveLevel()


def test_local_cluster_logs_warnings_only(caplog):
    """The scheduler (this process) logs no INFO record, and neither do the workers (spawned processes,
    where a root handler, as Prefect's logging set-up in a flow's worker gives them, would print every
    one): Prefect's console showed 53 of them in one `make run`."""
    from distributed import Client

    from pipeline.config import EngineParams
    from pipeline.engine import local_cluster

    caplog.set_level(logging.DEBUG)
    with local_cluster(EngineParams(kind="dask", workers=1)) as cluster, Client(cluster) as client:
        assert client.submit(sum, [1, 2]).result() == 3
        assert list(client.run(_distributed_level).values()) == [logging.WARNING]
    noisy = [r.getMessage() for r in caplog.records if r.name.startswith("distributed") and r.levelno < logging.WARNING]
    assert noisy == []


@pytest.fixture(scope="module")
def watched_run(prefect_harness):
    """The session's clean-checkout flow run (tests/pipeline_runs.clean_checkout_flow_run: cycle 0 and two
    refinement cycles, stages at INFO, a LocalCluster for the shard tasks, run as `python -m
    flows.refine`): its logs, artifacts and name, read back through the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.objects import Artifact
    from prefect.client.schemas.sorting import LogSort

    run = clean_checkout_flow_run()
    logs = []
    with get_client(sync_client=True) as client:
        while page := client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.run_id])), limit=200,
                                       offset=len(logs), sort=LogSort.TIMESTAMP_ASC):
            logs += page
        # by hand: prefect 3.8.8's read_artifacts sends null filters, which its own server refuses (422)
        body = {"artifacts": {"flow_run_id": {"any_": [run.run_id]}}, "limit": 50, "offset": 0, "sort": "KEY_ASC"}
        artifacts = [Artifact.model_validate(a) for a in client.request("POST", "/artifacts/filter", json=body).json()]
        name = client.read_flow_run(run.run_id).name
    return {"project": run.checkout, "logs": logs, "artifacts": {a.key: a for a in artifacts}, "name": name,
            "console": run.stdout + run.stderr}


def test_stage_output_reaches_the_run_log_with_its_stage(watched_run):
    messages = [(log.level, log.message) for log in watched_run["logs"]]
    epochs = [m for level, m in messages if level == logging.INFO
              and m.startswith("[train_baseline] pipeline.training: epoch 1/2 train_loss")]
    assert len(epochs) == 1, messages
    assert any(m.startswith("[segment] pipeline.segmentation: unet epoch 3/3") for _, m in messages)
    assert any(m.startswith("[train@c1] Running stage 'train@c1'") for _, m in messages)
    assert any(m.startswith("[evaluate@c1] __main__: cycle 1: AUROC") for _, m in messages)  # python -m: __main__


def test_dask_says_nothing_below_a_warning(watched_run):
    assert any("shard tasks run on the Dask cluster at tcp://" in log.message for log in watched_run["logs"])
    # Prefect's console handler writes "12:00:00.000 | INFO    | distributed.scheduler - ..."
    chatty = re.compile(r"\| (DEBUG|INFO) +\| distributed\.")
    assert [line for line in watched_run["console"].splitlines() if chatty.search(line)] == []
    assert not [log.message for log in watched_run["logs"] if "distributed." in log.message]


def test_each_cycle_and_the_table_are_markdown_artifacts(watched_run):
    import json

    artifacts = watched_run["artifacts"]
    summary = json.loads((watched_run["project"] / "reports" / "summary.json").read_text())
    assert set(artifacts) == {f"cycle-{c['cycle']}" for c in summary["cycles"]} | {"per-cycle-results"}
    assert len(summary["cycles"]) >= 2
    for c in summary["cycles"]:
        data = artifacts[f"cycle-{c['cycle']}"]
        assert data.type == "markdown"
        row = data.data.splitlines()[-1]
        assert row.startswith(f"| {c['cycle']} | {c['auroc_macro']:.3f} | {c['accuracy']:.3f} |"), data.data
    table = artifacts["per-cycle-results"].data
    assert [line.split(" | ")[0] for line in table.splitlines() if line.startswith("| ") and "---" not in line] == \
        ["| cycle"] + [f"| {c['cycle']}" for c in summary["cycles"]]
    report = (watched_run["project"] / "reports" / "index.html").resolve().as_uri()
    assert f"]({report})" in table and summary["stop_reason"] in table


def test_the_run_is_named_after_its_dataset_and_policy(watched_run):
    assert watched_run["name"].startswith("phantom-counterfactual-"), watched_run["name"]
