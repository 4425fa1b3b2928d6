"""What a flow run shows in the Prefect UI beside its log: a name that says what ran, and its scores
as markdown artifacts (one per cycle as it finishes, one for the whole table with the report's link)."""
from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path

from prefect.artifacts import create_markdown_artifact

from pipeline.scores import CycleScores


def run_name(*parts: str) -> str:
    """`phantom-counterfactual-20261205-113924`: the parts, then the start time (names need not be unique,
    the time tells runs of the same setup apart)."""
    words = [re.sub(r"[^a-z0-9]+", "-", str(p).lower()).strip("-") for p in parts]
    return "-".join([w for w in words if w] + [f"{datetime.now():%Y%m%d-%H%M%S}"])


def markdown_table(cycles: list[dict]) -> str:
    """The per-cycle table (`make run`'s columns, CycleScores.TABLE) in markdown."""
    head = ["cycle", *CycleScores.TABLE]
    rows = [[str(c["cycle"]), *("-" if c.get(k) is None else f"{c[k]:.3f}" for k in CycleScores.TABLE)]
            for c in cycles]
    return "\n".join("| " + " | ".join(row) + " |"
                     for row in [head, ["---:"] * len(head), *rows])


def publish_cycle(metrics: dict) -> None:
    """Artifact `cycle-K`: cycle K's headline scores (its reports/cycles/cK/metrics.json)."""
    k = metrics["cycle"]
    create_markdown_artifact(f"## Cycle {k}\n\n{markdown_table([metrics])}\n", key=f"cycle-{k}",
                             description=f"cycle {k} scores on unmodified test images")


def publish_results(summary: dict, report: Path) -> None:
    """Artifact `per-cycle-results`: every cycle's scores, the stop reason and the report's link."""
    url = report.resolve().as_uri()
    create_markdown_artifact(
        f"## Per-cycle results ({summary['dataset']})\n\n{markdown_table(summary['cycles'])}\n\n"
        f"Stop: {summary['stop_reason']}\n\nReport: [{url}]({url})\n",
        key="per-cycle-results", description="every cycle's scores and the report")
