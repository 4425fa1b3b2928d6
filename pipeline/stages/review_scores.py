"""DVC stage `review_scores`: every evaluated cycle against the clinicians' marks -> reports/review.json.

Depends on data/feedback and the cycles, so a new review re-runs it (and the enhancement onward),
never the cycles' own evaluations.
"""
import logging

from pipeline.config import Paths
from pipeline.cycle_control import load_cycles
from pipeline.io import write_json
from pipeline.models.checkpoint import cycle_models
from pipeline.review_scores import review_scores
from pipeline.stages.common import stage_main

log = logging.getLogger(__name__)


def run(params, paths: Paths, args) -> None:
    cycles = load_cycles(paths, params.cycle_ids())
    if not cycles:
        raise ValueError("no evaluated cycle found under reports/cycles; run the evaluate stages first")
    models, arch = cycle_models(params, paths, cycles, "cpu")
    result = review_scores(params, paths, cycles, models, arch)
    write_json(paths.review_scores, result)
    log.info("%d marks by %d reviewers scored against %d cycles", result["n_marks"], result["n_reviewers"],
             len(cycles))


if __name__ == "__main__":
    stage_main("review_scores", run)
