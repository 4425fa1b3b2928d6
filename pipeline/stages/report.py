"""DVC stage `report`: summary.json, index.html, figures and models/latest.json; prints the table."""
import logging

from pipeline.report import build_report, format_table, sanity_lines
from pipeline.stages.common import stage_main

log = logging.getLogger(__name__)


def run(params, paths, args) -> None:
    result = build_report(params, paths)
    log.info("per-cycle results (unmodified test images):\n%s\n%s", format_table(result["cycles"]),
             "\n".join(sanity_lines(result["sanity"])))


if __name__ == "__main__":
    stage_main("report", run)
