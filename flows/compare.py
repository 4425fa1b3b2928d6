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

from pipeline.config import ConfigError, Paths, load_params
from pipeline.enhance import POLICIES
from pipeline.report import build_policy_comparison, format_policy_table

EXP_PREFIX = "policy-"


def _dvc(args: list[str], root: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True,
                          env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    if check and proc.returncode:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"dvc {' '.join(args)} failed (exit {proc.returncode}):\n{tail}")
    return proc


@task(name="dvc-exp-run", task_run_name="exp {policy}")
def run_policy(policy: str, root: str) -> str:
    name = EXP_PREFIX + policy
    _dvc(["exp", "remove", name], root, check=False)  # a rerun replaces the previous experiment
    # the comparison reads the cycles' metrics: no label-permutation twin (cycle 0's, which no policy
    # changes) is trained in each experiment's temporary copy
    args = ["-S", f"enhance.policy={policy}", "-S", "sanity.label_permutation=false"]
    get_run_logger().info("$ dvc exp run --temp -n %s %s", name, " ".join(args))
    _dvc(["exp", "run", "--temp", "-n", name, *args], root)
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


@flow(name="cxr-compare-policies", log_prints=False)
def compare_policies(root: str = ".", policies: list[str] | None = None) -> dict:
    """Run the cycle once per enhancement policy; returns reports/policies/summary.json."""
    logger = get_run_logger()
    params = load_params(Path(root) / "params.yaml")
    policies = list(policies or POLICIES)
    unknown = sorted(set(policies) - set(POLICIES))
    if unknown:
        raise ConfigError(f"policies: unknown {unknown}; available: {', '.join(POLICIES)}")
    if subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=root, capture_output=True).returncode:
        raise RuntimeError("DVC experiments need a git commit: commit the project first")
    step = run_policy.with_options(retries=params.flow.retries, retry_delay_seconds=2)
    names = [step(policy, root) for policy in policies]
    shown = json.loads(_dvc(["exp", "show", "--json"], root).stdout)
    by_name = experiment_cycles(shown, names)
    missing = [n for n in names if not by_name.get(n)]
    if missing:
        raise RuntimeError(f"no metrics found for experiments {missing} in `dvc exp show`")
    results = {name.removeprefix(EXP_PREFIX): by_name[name] for name in names}
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
