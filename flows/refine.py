"""Prefect flow: launch the refinement cycle stage by stage through `dvc repro`, watch it, stop early.

Thin by design: every stage is `dvc repro <stage>` (so `dvc repro` alone reproduces the same
artefacts); the flow adds retries, the stages' output in the run log as it is written (tagged with
each line's stage), a markdown artifact of each cycle's scores, the stop rule of
pipeline.cycle_control, and one Dask cluster shared by every stage's shard tasks. Runs with no
server (ephemeral) or against `prefect server start` (set PREFECT_API_URL).

Every stage reads params.yaml, so that is the flow's one params file: change a value with
`dvc exp run -S key=value` (which runs the stages itself) or write a preset into it with
`python -m pipeline.presets NAME --apply`.
"""
from __future__ import annotations

import argparse
import os
import sys
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Iterator

from prefect import flow, get_run_logger, task
from prefect.runtime import flow_run

from flows.publish import publish_cycle, publish_results, run_name
from flows.stage_log import run_logged

from pipeline.compute import clean_thread_env
from pipeline.config import ConfigError, EngineParams, Paths, load_params
from pipeline.engine import ADDRESS_ENV, local_cluster, resolve
from pipeline.cycle_control import STOPPED, decide
from pipeline.io import read_json
from pipeline.report import format_table, sanity_lines
from pipeline.scores import CycleScores


def _run(cmd: list[str], root: Path, stage: str, dask_address: str | None = None) -> None:
    """`cmd`'s output into the run log line by line, each line tagged with its stage (`stage` until dvc
    names another); a failure raises with its last lines."""
    logger = get_run_logger()
    logger.info("$ %s", " ".join(cmd))
    # the stage sets its own threads (compute.threads): none of the cluster's OMP_NUM_THREADS=1 leaks in
    env = {**clean_thread_env(os.environ), "DVC_NO_ANALYTICS": "1", **({ADDRESS_ENV: dask_address} if dask_address else {})}
    run_logged(cmd, root, env, logger, stage)


@task(name="dvc-repro", task_run_name="repro {stage}")
def repro(stage: str, root: str, dask_address: str | None = None) -> None:
    """One stage (and anything stale upstream of it); cached stages cost nothing. Its shard tasks
    run on the Dask cluster at `dask_address` when one is given."""
    _run([sys.executable, "-m", "dvc", "repro", stage], Path(root), stage, dask_address)


def _log_sanity(paths: Paths) -> None:
    """The sanity checks' lines as `make run` prints them; a warning where one failed."""
    logger = get_run_logger()
    result = read_json(paths.sanity)
    for line in sanity_lines(result):
        logger.info("%s", line)
    for check in ("cascading_randomization", "label_permutation"):
        if (result.get(check) or {}).get("passed") is False:
            logger.warning("saliency sanity check failed: %s", result[check]["reason"])


@contextmanager
def shared_cluster(p: EngineParams, address: str | None, device: str = "auto") -> Iterator[str | None]:
    """The Dask scheduler every stage of this run sends its shard tasks to: `address` (a real
    cluster), else one LocalCluster started here for the whole run (not one per stage); None when
    the engine is in-process."""
    p = resolve(p)
    if p.kind == "local":
        yield None
    elif address or p.address:
        yield address or p.address
    else:
        with local_cluster(p, device) as cluster:  # one worker per GPU when compute.device means CUDA
            yield cluster.scheduler_address


def _run_name() -> str:
    """The run's name: its dataset and enhancement policy (`phantom-counterfactual-<time>`)."""
    params = load_params(Paths(flow_run.parameters.get("root", ".")).params)
    return run_name(params.data.source, params.enhance.policy)


@flow(name="cxr-refine", flow_run_name=_run_name, log_prints=False)
def refine(root: str = ".", dask_address: str | None = None) -> dict:
    """Run cycle 0 and every configured cycle; returns reports/summary.json."""
    params = load_params(Paths(root).params)  # bad params fail here, before any work
    with shared_cluster(params.engine, dask_address, params.compute.device) as address:
        return _cycles(root, params, address)


def _cycles(root: str, params, address: str | None) -> dict:
    logger = get_run_logger()
    if address:
        logger.info("shard tasks run on the Dask cluster at %s", address)
    paths = Paths(root)
    step = partial(repro.with_options(retries=params.flow.retries, retry_delay_seconds=2), dask_address=address)
    for stage in ("prepare", "segment", "audit", "train_baseline", "evaluate_baseline"):
        step(stage, root)
    history = [read_json(paths.cycle_metrics(0))]
    logger.info("cycle 0: %s", {k: history[-1].get(k) for k in CycleScores.TABLE})
    publish_cycle(history[-1])
    for k in params.cycle_ids()[1:]:
        # after a stop the cycle's stages still run, in seconds: each writes placeholders
        # (cycle_control.stop_reason_before), so dvc.lock covers every stage and `dvc status` is clean
        for stage in ("cam", "enhance", "train", "evaluate"):
            step(f"{stage}@c{k}", root)
        metrics = read_json(paths.cycle_metrics(k))
        if metrics.get(STOPPED):
            logger.info("cycle %d skipped: %s", k, metrics[STOPPED])
            continue
        history.append(metrics)
        logger.info("cycle %d: %s", k, {key: history[-1].get(key) for key in CycleScores.TABLE})
        publish_cycle(history[-1])
        decision = decide(history, params.flow)
        if decision.stop and k != params.cycle_ids()[-1]:
            logger.warning("stopping early: %s (the later cycles' stages only record that)", decision.reason)
    for stage in ("sanity_twin", "sanity", "review_scores"):
        step(stage, root)
    _log_sanity(paths)
    step("report", root)
    result = read_json(paths.summary)
    logger.info("per-cycle results:\n%s\nstop: %s", format_table(result["cycles"]), result["stop_reason"])
    publish_results(result, paths.report_html)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m flows.refine", description="The refinement cycle through the Prefect flow.",
        epilog="Every stage reads ROOT/params.yaml: change a value with `dvc exp run -S key=value`, or write a "
               "preset into params.yaml with `python -m pipeline.presets NAME --apply`.")
    parser.add_argument("--root", default=".")
    parser.add_argument("--dask-address", default=None,
                        help="a running Dask scheduler (tcp://host:8786) for the shard tasks; default engine.address "
                             "from params, else a LocalCluster for this run")
    args = parser.parse_args()
    try:  # a wrong param is one line on stderr, before the flow (or its temporary server) starts
        load_params(Paths(args.root).params)
    except ConfigError as err:
        sys.exit(f"error: {err}")
    refine(root=args.root, dask_address=args.dask_address)


if __name__ == "__main__":
    main()
