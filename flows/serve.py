"""Serve the refine flow as a Prefect deployment from this process: it registers the deployment
(optionally on a cron schedule) with the Prefect API and runs each scheduled or UI/CLI-triggered run
as a subprocess here. The no-work-pool way to schedule the cycle; for a worker on a work pool see
prefect.yaml and docs/distributed.md.

    python -m flows.serve [--cron "0 2 * * *"] [--name NAME] [--root .]

Each run reads --root's params.yaml, the one params file every stage reads.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from prefect.deployments.runner import RunnerDeployment

from flows.refine import refine

log = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m flows.serve")
    parser.add_argument("--name", default="refine-local", help="deployment name")
    parser.add_argument("--cron", help='e.g. "0 2 * * *"; without it runs only when triggered')
    parser.add_argument("--root", default=".", help="the project checkout the runs work in")
    parser.add_argument("--limit", type=int, default=1,
                        help="concurrent runs; 1 because runs share one DVC workspace")
    parser.add_argument("--dask-address", default=None,
                        help="a Dask scheduler (tcp://host:8786) for the stages' shard tasks")
    return parser.parse_args(argv)


def build_deployment(args: argparse.Namespace) -> RunnerDeployment:
    """The deployment object alone (nothing registered or started), so it can be checked offline.
    root is made absolute so a run does not depend on the directory its process happens to start in."""
    return refine.to_deployment(
        name=args.name, cron=args.cron, tags=["cxr-refine"],
        parameters={"root": str(Path(args.root).resolve()), "dask_address": args.dask_address},
        description="Refinement cycle via dvc repro (flows/refine.py)")


def main(argv: list[str] | None = None) -> None:
    from prefect import serve

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    deployment = build_deployment(args)
    log.info("serving deployment %s/%s (schedule: %s); Ctrl-C stops", refine.name, args.name,
             args.cron or "none, trigger with `prefect deployment run`")
    serve(deployment, limit=args.limit)


if __name__ == "__main__":
    main()
