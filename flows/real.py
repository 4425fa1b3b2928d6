"""Prefect flow behind `make real`: the refinement cycle on real films, as DVC experiments.

Kermany's paediatric films (`KERMANY`, the folder holding `train/` and `test/`), the anatomy U-Net
trained on JSRT's lungs and heart (`JSRT`, the folder holding `images/` and `masks/`), and the
shortcut audit on (a marker agreeing with Pneumonia with p = 0.95, disagreeing in test_shifted), on
the settings of the preset `params/real-kermany-jsrt.yaml`. Without folders it uses
`$CXR_REAL_DATA/{kermany-224/chest_xray,jsrt-scr}` (default `../shared/data`).

The first policy runs as `dvc exp run -n real-<policy>` in the workspace, so its reports land in
reports/ and `make viewer` serves its model (params.yaml then holds the experiment's values, as after
any `dvc exp run`; `git checkout params.yaml` returns to the phantom). Further policies run in
temporary copies, reusing prepare, segment and cycle 0 from DVC's run-cache. reports/real/ gets the
side-by-side table and the targets of the real-data claim, met or not.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows.compare import check_committed, collect, run_policy
from flows.publish import run_name
from pipeline.audit import read_audit_summary
from pipeline.config import ConfigError, Paths, real_data_dir
from pipeline.enhance import POLICIES
from pipeline.presets import dvc_set_args, load_preset, resolve
from pipeline.report import build_policy_comparison, format_policy_table

PRESET = "real-kermany-jsrt"
EXP_PREFIX = "real-"
DEFAULT_POLICY = "counterfactual"
# the claim on real films, last cycle vs cycle 0 (README, "Real radiographs")
TARGETS = {"cam_in_anatomy_gain": 0.25, "shortcut_gap_max": 0.03, "auroc_drop_max": 0.02}


def default_folders() -> tuple[Path, Path]:
    base = real_data_dir()
    return base / "kermany-224" / "chest_xray", base / "jsrt-scr"


def check_folders(kermany: Path, jsrt: Path) -> None:
    """A clear error before anything runs when a folder is not the dataset it should be."""
    if not any((kermany / s / c).is_dir() for s in ("train", "test") for c in ("NORMAL", "PNEUMONIA")):
        raise ConfigError(f"KERMANY={kermany}: no train/ or test/ with NORMAL/ and PNEUMONIA/ folders "
                          "(the Kaggle chest-xray-pneumonia download, its chest_xray/ folder)")
    if not (jsrt / "masks" / "heart").is_dir():
        raise ConfigError(f"JSRT={jsrt}: no masks/heart/ folder (JSRT images with the SCR masks)")


def targets(cycles: list[dict]) -> dict:
    """Each target of the real-data claim with its measured figure, last cycle vs cycle 0."""
    first, last = cycles[0], cycles[-1]
    gain = (last["cam_in_anatomy"] / first["cam_in_anatomy"] - 1
            if first.get("cam_in_anatomy") and last.get("cam_in_anatomy") is not None else None)
    gap, drop = last.get("shortcut_gap"), (first["auroc_macro"] - last["auroc_macro"]
                                           if None not in (first.get("auroc_macro"), last.get("auroc_macro")) else None)
    return {
        "cam_in_anatomy_gain": {"value": gain, "target": f">= {TARGETS['cam_in_anatomy_gain']}",
                                "met": gain is not None and gain >= TARGETS["cam_in_anatomy_gain"]},
        "shortcut_gap": {"value": gap, "cycle0": first.get("shortcut_gap"), "target": f"<= {TARGETS['shortcut_gap_max']}",
                         "met": gap is not None and gap <= TARGETS["shortcut_gap_max"]},
        "auroc_drop": {"value": drop, "target": f"<= {TARGETS['auroc_drop_max']}",
                       "met": drop is not None and drop <= TARGETS["auroc_drop_max"]},
    }


def _run_name() -> str:
    """The run's name: the preset's dataset and the policies (`kermany-counterfactual-<time>`)."""
    source = load_preset(PRESET, flow_run.parameters.get("root", "."))["data"]["source"]
    return run_name(source, *(flow_run.parameters.get("policies") or [DEFAULT_POLICY]))


@flow(name="cxr-real", flow_run_name=_run_name, log_prints=False)
def real(root: str = ".", kermany: str | None = None, jsrt: str | None = None,
         policies: list[str] | None = None) -> dict:
    """Run the cycle on the real folders under each policy; returns reports/real/summary.json."""
    logger = get_run_logger()
    default_k, default_j = default_folders()
    k_dir, j_dir = Path(kermany or default_k).resolve(), Path(jsrt or default_j).resolve()
    check_folders(k_dir, j_dir)
    policies = list(policies or [DEFAULT_POLICY])
    unknown = sorted(set(policies) - set(POLICIES))
    if unknown:
        raise ConfigError(f"policies: unknown {unknown}; available: {', '.join(POLICIES)}")
    base, overrides, params = resolve(PRESET, root, data_root=str(k_dir))
    overrides["segment"] = {**overrides.get("segment", {}), "mask_sources": {"jsrt": str(j_dir)}}
    sets = tuple(dvc_set_args(overrides, base))
    check_committed(root)
    t0, times, names = time.monotonic(), {}, []
    for i, policy in enumerate(policies):
        start = time.monotonic()
        names.append(run_policy(policy, root, EXP_PREFIX, sets, temp=i > 0))
        times[policy] = round(time.monotonic() - start, 1)
        logger.info("real-%s finished in %.1f min", policy, times[policy] / 60)
    results = collect(root, names, EXP_PREFIX)
    paths = Paths(root)
    extra = {"kermany": str(k_dir), "jsrt": str(j_dir), "seconds": times,
             "total_seconds": round(time.monotonic() - t0, 1),
             "targets": {policy: targets(cycles) for policy, cycles in results.items()},
             "audit": read_audit_summary(paths.audit_summary)}
    summary = build_policy_comparison(params, paths, results, name="real", exp_prefix=EXP_PREFIX, extra=extra)
    logger.info("real films (unmodified test images):\n%s", format_policy_table(summary))
    return summary


def format_targets(summary: dict) -> str:
    lines = []
    for policy, t in summary["targets"].items():
        cells = [f"{k} {'-' if v['value'] is None else format(v['value'], '.3f')} ({v['target']}: "
                 f"{'met' if v['met'] else 'MISSED'})" for k, v in t.items()]
        lines.append(f"[{policy}] " + "; ".join(cells))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.real", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=".")
    parser.add_argument("--kermany", default=None, help="Kermany chest_xray/ folder (default: $CXR_REAL_DATA/...)")
    parser.add_argument("--jsrt", default=None, help="JSRT + SCR folder (default: $CXR_REAL_DATA/jsrt-scr)")
    parser.add_argument("policies", nargs="*", help=f"default: {DEFAULT_POLICY}; any of {', '.join(POLICIES)}")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        summary = real(root=args.root, kermany=args.kermany, jsrt=args.jsrt, policies=args.policies or None)
    except ConfigError as err:
        sys.exit(f"error: {err}")
    sys.stdout.write(format_policy_table(summary) + "\n" + format_targets(summary) + "\n"
                     f"whole run: {summary['total_seconds'] / 60:.1f} min; report: reports/index.html, "
                     "reports/real/index.html\n")


if __name__ == "__main__":
    main()
