"""Prefect flow: launch the refinement cycle stage by stage through `dvc repro`, watch it, stop early.

Thin by design: every stage is `dvc repro <stage>` (so `dvc repro` alone reproduces the same
artefacts); the flow adds retries, per-cycle metric logs and the stop rule of
pipeline.cycle_control. Runs with no server (ephemeral) or against `prefect server start`
(set PREFECT_API_URL).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from prefect import flow, get_run_logger, task

from pipeline.config import ConfigError, Paths, load_params
from pipeline.cycle_control import decide
from pipeline.io import read_json
from pipeline.report import TABLE_KEYS, format_table


def _run(cmd: list[str], root: Path) -> None:
    logger = get_run_logger()
    logger.info("$ %s", " ".join(cmd))
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{tail}")
    logger.debug(tail)


@task(name="dvc-repro", task_run_name="repro {stage}")
def repro(stage: str, root: str) -> None:
    """One stage (and anything stale upstream of it); cached stages cost nothing."""
    _run([sys.executable, "-m", "dvc", "repro", stage], Path(root))


@task(name="report-early-stop")
def report_early(root: str, reason: str, last_cycle: int) -> None:
    """After an early stop the report covers the cycles that ran; dvc's lock for `report` is left
    untouched, so a later plain `dvc repro` still runs the configured cycles in full."""
    _run([sys.executable, "-m", "pipeline.stages.report", "--stop-reason", reason,
          "--last-cycle", str(last_cycle)], Path(root))


@flow(name="cxr-refine", log_prints=False)
def refine(root: str = ".", params_file: str = "params.yaml") -> dict:
    """Run cycle 0 and every configured cycle; returns reports/summary.json."""
    logger = get_run_logger()
    params = load_params(Path(root) / params_file)  # bad params fail here, before any work
    paths = Paths(root)
    step = repro.with_options(retries=params.flow.retries, retry_delay_seconds=2)
    for stage in ("prepare", "segment", "train_baseline", "evaluate_baseline"):
        step(stage, root)
    history = [read_json(paths.cycle_metrics(0))]
    logger.info("cycle 0: %s", {k: history[-1].get(k) for k in TABLE_KEYS})
    stopped = None
    for k in params.cycle_ids()[1:]:
        for stage in ("cam", "enhance", "train", "evaluate"):
            step(f"{stage}@c{k}", root)
        history.append(read_json(paths.cycle_metrics(k)))
        logger.info("cycle %d: %s", k, {key: history[-1].get(key) for key in TABLE_KEYS})
        decision = decide(history, params.flow)
        if decision.stop and k != params.cycle_ids()[-1]:
            stopped = decision.reason
            logger.warning("stopping early: %s", stopped)
            break
    if stopped:
        report_early(root, stopped, history[-1]["cycle"])
    else:
        step("report", root)
    result = read_json(paths.summary)
    logger.info("per-cycle results:\n%s\nstop: %s", format_table(result["cycles"]), result["stop_reason"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.refine")
    parser.add_argument("--root", default=".")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    try:  # a wrong param is one line on stderr, before the flow (or its temporary server) starts
        load_params(Path(args.root) / args.params)
    except ConfigError as err:
        sys.exit(f"error: {err}")
    refine(root=args.root, params_file=args.params)


if __name__ == "__main__":
    main()
