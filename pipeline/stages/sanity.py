"""DVC stage `sanity`: both saliency sanity checks of the served model -> reports/sanity.json."""
import logging

from pipeline.io import write_json
from pipeline.sanity_checks import run_sanity_checks
from pipeline.stages.common import stage_main

log = logging.getLogger(__name__)


def _fmt(check: dict, key: str) -> str:
    if check.get(key) is None:
        return check.get("reason") or "n/a"
    return f"rank corr {check[key]:.3f} ({'pass' if check['passed'] else 'FAIL'})"


def run(params, paths, args) -> None:
    result = run_sanity_checks(params, paths)
    write_json(paths.sanity, result)
    log.info("saliency sanity of cycle %d: cascading randomisation %s; label permutation %s",
             result["served_cycle"], _fmt(result["cascading_randomization"], "final_rank_corr"),
             _fmt(result["label_permutation"], "rank_corr"))
    for check in ("cascading_randomization", "label_permutation"):
        if result[check]["passed"] is False:
            log.warning("saliency sanity check failed: %s", result[check]["reason"])


if __name__ == "__main__":
    stage_main("sanity", run)
