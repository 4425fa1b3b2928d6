"""DVC stage `sanity_twin`: the label-permutation twin of cycle 0 -> models/sanity_twin.

With `sanity.label_permutation` off, the folder holds only model.json saying so, and the `sanity`
stage reports the check as not run.
"""
import logging

from pipeline.io import write_json
from pipeline.models.checkpoint import MODEL_FILE, save_model
from pipeline.sanity_checks import train_twin
from pipeline.stages.common import stage_main
from pipeline.training import RESUME_FILE

log = logging.getLogger(__name__)


def run(params, paths, args) -> None:
    out = paths.sanity_twin
    out.mkdir(parents=True, exist_ok=True)
    if not params.sanity.label_permutation:
        (out / MODEL_FILE).unlink(missing_ok=True)
        write_json(out / "model.json", {"skipped": True, "reason": "sanity.label_permutation is false"})
        log.info("label-permutation twin not trained: sanity.label_permutation is false")
        return
    twin, meta = train_twin(params, paths)
    save_model(out, twin, meta)
    (paths.sanity_resume / RESUME_FILE).unlink(missing_ok=True)  # done: DVC keeps the twin now


if __name__ == "__main__":
    stage_main("sanity_twin", run)
