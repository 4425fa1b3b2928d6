"""Prefect flow: compare enhancement policies on the same data with DVC experiments.

Each policy is `dvc exp run --temp -S enhance.policy=<policy>` (a temporary copy of the workspace, so
the workspace's own run is untouched); stages a policy does not affect (prepare, segment, cycle 0,
the first CAMs) come back from DVC's run-cache instead of being recomputed. The experiments stay in
`dvc exp show`; this flow reads their per-cycle metrics and writes reports/policies/.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.runtime import flow_run

from flows.publish import run_name
from flows.stage_log import run_logged
from pipeline.compute import clean_thread_env
from pipeline.config import ConfigError, Paths, load_params
from pipeline.enhance import POLICIES
from pipeline.report import build_policy_comparison, format_policy_table

EXP_PREFIX = "policy-"


def _env() -> dict[str, str]:
    return {**clean_thread_env(os.environ), "DVC_NO_ANALYTICS": "1"}


def _dvc(args: list[str], root: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True,
                          env=_env())
    if check and proc.returncode:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"dvc {' '.join(args)} failed (exit {proc.returncode}):\n{tail}")
    return proc


@task(name="dvc-exp-run", task_run_name="exp {policy}")
def run_policy(policy: str, root: str, prefix: str = EXP_PREFIX, sets: tuple[str, ...] = (),
               temp: bool = True) -> str:
    """One experiment: `sets` (`-S` arguments) plus the policy; `temp` runs it in a temporary copy, else in
    the workspace (which then holds its outputs and params, as after any `dvc exp run`). Its stages'
    output reaches the run log as it is written, each line tagged with its stage."""
    name = prefix + policy
    _dvc(["exp", "remove", name], root, check=False)  # a rerun replaces the previous experiment
    args = [*sets, "-S", f"enhance.policy={policy}"]
    cmd = ["exp", "run", *(["--temp"] if temp else []), "-n", name, *args]
    logger = get_run_logger()
    logger.info("$ dvc %s", " ".join(cmd))
    run_logged([sys.executable, "-m", "dvc", *cmd], root, _env(), logger, name)
    return name


def experiment_cycles(exp_show: list[dict], names: list[str]) -> dict[str, list[dict]]:
    """From `dvc exp show --json`: each named experiment's per-cycle headline metrics, in cycle order."""
    out: dict[str, list[dict]] = {}
    for baseline in exp_show:
        for exp in baseline.get("experiments") or []:
            if exp.get("name") not in names or not exp.get("revs"):
                continue
            metrics = exp["revs"][0]["data"].get("metrics", {})
            cycles = [m["data"] for path, m in metrics.items()
                      if path.startswith("reports/cycles/") and path.endswith("/metrics.json") and "data" in m]
            out[exp["name"]] = sorted(cycles, key=lambda c: c["cycle"])
    return out


def collect(root: str, names: list[str], prefix: str) -> dict[str, list[dict]]:
    """policy -> per-cycle metrics of each named experiment, from `dvc exp show`."""
    shown = json.loads(_dvc(["exp", "show", "--json"], root).stdout)
    by_name = experiment_cycles(shown, names)
    missing = [n for n in names if not by_name.get(n)]
    if missing:
        raise RuntimeError(f"no metrics found for experiments {missing} in `dvc exp show`")
    return {name.removeprefix(prefix): by_name[name] for name in names}


def check_committed(root: str) -> None:
    if subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=root, capture_output=True).returncode:
        raise RuntimeError("DVC experiments need a git commit: commit the project first")


def _run_name() -> str:
    """The run's name: its dataset and the policies compared (`phantom-counterfactual-overlay-<time>`)."""
    root = flow_run.parameters.get("root", ".")
    source = load_params(Paths(root).params).data.source
    return run_name(source, *(flow_run.parameters.get("policies") or POLICIES))


@flow(name="cxr-compare-policies", flow_run_name=_run_name, log_prints=False)
def compare_policies(root: str = ".", policies: list[str] | None = None) -> dict:
    """Run the cycle once per enhancement policy; returns reports/policies/summary.json."""
    logger = get_run_logger()
    params = load_params(Path(root) / "params.yaml")
    policies = list(policies or POLICIES)
    unknown = sorted(set(policies) - set(POLICIES))
    if unknown:
        raise ConfigError(f"policies: unknown {unknown}; available: {', '.join(POLICIES)}")
    check_committed(root)
    step = run_policy.with_options(retries=params.flow.retries, retry_delay_seconds=2)
    names = [step(policy, root) for policy in policies]
    results = collect(root, names, EXP_PREFIX)
    summary = build_policy_comparison(params, Paths(root), results)
    logger.info("enhancement policies (unmodified test images):\n%s", format_policy_table(summary))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.compare")
    parser.add_argument("--root", default=".")
    parser.add_argument("policies", nargs="*", help=f"default: all of {', '.join(POLICIES)}")
    args = parser.parse_args()
    try:
        load_params(Path(args.root) / "params.yaml")
    except ConfigError as err:
        sys.exit(f"error: {err}")
    compare_policies(root=args.root, policies=args.policies or None)


if __name__ == "__main__":
    main()
