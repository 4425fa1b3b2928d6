"""Every artefact path of a project, relative to its root. dvc.yaml mirrors these.

`Paths` is the one place that spells a folder or file name of an artefact: tests/test_paths.py fails
on a `root / "reports" / ...` (or `"summary.json"`) built anywhere else in pipeline/, flows/,
benchmarks/ or examples/."""
from __future__ import annotations

import os
from pathlib import Path


REAL_DATA_ENV = "CXR_REAL_DATA"


def real_data_dir() -> Path:
    """Where the real radiographs live by default (`kermany-224/`, `jsrt-scr/`): $CXR_REAL_DATA, else
    ../shared/data beside the repository. `make real` and the real-data tests both start here."""
    return Path(os.environ.get(REAL_DATA_ENV) or Path(__file__).resolve().parents[3] / "shared" / "data")


class Paths:
    """Every artefact path, relative to the project root. dvc.yaml mirrors these.

    `manifest`, `images` and `masks` are the films the cycle trains and scores on: the prepared ones
    and the U-Net's masks, or, with the shortcut audit on (`audit=True`), the audit stage's copies
    with the marker planted and a test_shifted split added. prepare and segment, which come before
    the audit, use `prepared_manifest`, `prepared_images` and `predicted_masks`."""

    def __init__(self, root: str | os.PathLike = ".", audit: bool = False):
        self.root = Path(root)
        self.audit_on = bool(audit)

    # the project's own files
    @property
    def params(self) -> Path:
        """The default params file (a stage's or the flow's `--params` may name another)."""
        return self.root / "params.yaml"

    @property
    def dvc_lock(self) -> Path:
        """What `dvc repro` recorded: each output's md5 (the viewer's model card cites the served model's)."""
        return self.root / "dvc.lock"

    # the three artefact folders
    @property
    def data(self) -> Path:
        """Raw and prepared films, masks, CAMs, the enhanced sets."""
        return self.root / "data"

    @property
    def models(self) -> Path:
        """The checkpoints, latest.json and the resumable training states."""
        return self.root / "models"

    @property
    def reports(self) -> Path:
        """Scores, figures and the HTML report."""
        return self.root / "reports"

    # raw and prepared data
    @property
    def raw(self) -> Path:
        """Where a downloaded dataset goes by default (data.root points into it; prepare depends on it)."""
        return self.data / "raw"

    @property
    def prepared(self) -> Path:
        return self.data / "prepared"

    @property
    def prepared_manifest(self) -> Path:
        return self.prepared / "manifest.parquet"

    @property
    def prepared_images(self) -> Path:
        return self.prepared / "images"

    @property
    def prepare_summary(self) -> Path:
        """What prepare wrote: films and patients per split, positives per label, files quarantined."""
        return self.prepared / "summary.json"

    @property
    def manifest(self) -> Path:
        return self.audit / "manifest.parquet" if self.audit_on else self.prepared_manifest

    @property
    def boxes(self) -> Path:
        return self.prepared / "boxes.parquet"

    @property
    def images(self) -> Path:
        return self.audit / "images" if self.audit_on else self.prepared_images

    @property
    def gt_masks(self) -> Path:
        return self.prepared / "masks"

    @property
    def grid(self) -> Path:
        return self.prepared / "grid.json"

    @property
    def quarantine(self) -> Path:
        """Files a source could not read, with the reason (the run goes on without them)."""
        return self.reports / "quarantine.csv"

    # segmentation
    @property
    def predicted_masks(self) -> Path:
        return self.data / "segment" / "masks"

    @property
    def masks(self) -> Path:
        return self.audit / "masks" if self.audit_on else self.predicted_masks

    @property
    def unet(self) -> Path:
        return self.models / "unet"

    @property
    def unet_weights(self) -> Path:
        return self.unet / "unet.safetensors"

    @property
    def segment_report(self) -> Path:
        return self.reports / "segment"

    @property
    def segment_metrics(self) -> Path:
        """The U-Net's Dice and IoU on held-out films (a DVC metric)."""
        return self.segment_report / "metrics.json"

    @property
    def segment_implausible(self) -> Path:
        """One row per film whose predicted mask failed a plausibility check."""
        return self.segment_report / "implausible.csv"

    def segment_preview(self, split: str) -> Path:
        return self.segment_report / f"preview_{split}.png"

    # clinician feedback (the viewer's review mode writes it; pipeline/feedback.py reads it)
    @property
    def feedback(self) -> Path:
        """Reviewers' marks: append-only JSONL, never edited (a retraction is a new record)."""
        return self.data / "feedback"

    @property
    def feedback_log(self) -> Path:
        return self.feedback / "marks.jsonl"

    @property
    def review_scores(self) -> Path:
        """Every cycle against the reviewers' marks (stage review_scores; pipeline/review_scores.py)."""
        return self.reports / "review.json"

    # shortcut audit
    @property
    def audit(self) -> Path:
        return self.data / "audit"

    @property
    def audit_markers(self) -> Path:
        """One row per film of the audited set: where the marker is and whether it is drawn."""
        return self.audit / "markers.parquet"

    @property
    def audit_summary(self) -> Path:
        return self.audit / "audit.json"

    # per cycle
    def model(self, cycle: int) -> Path:
        return self.models / f"c{cycle}"

    def train_history(self, cycle: int) -> Path:
        """One row per epoch of the cycle's training (columns: training.HISTORY_KEYS; a DVC plot)."""
        return self.reports / "train" / f"c{cycle}" / "history.csv"

    def cams(self, cycle: int) -> Path:
        return self.data / "cams" / f"c{cycle}"

    def enhanced(self, cycle: int) -> Path:
        return self.data / "enhanced" / f"c{cycle}"

    def enhanced_train(self, cycle: int) -> Path:
        return self.enhanced(cycle) / "train"

    def enhanced_val(self, cycle: int) -> Path:
        """Present for label-blind policies: the val images under the same transform."""
        return self.enhanced(cycle) / "val"

    def enhance_report(self, cycle: int) -> Path:
        return self.reports / "enhance" / f"c{cycle}"

    def enhance_stats(self, cycle: int) -> Path:
        """The enhancement plan's numbers and the class separability before and after (a DVC metric)."""
        return self.enhance_report(cycle) / "stats.json"

    def enhance_figures(self, cycle: int) -> Path:
        """atlas.png and examples.png, which reports/index.html shows."""
        return self.enhance_report(cycle) / "figures"

    def cycle_report(self, cycle: int) -> Path:
        return self.reports / "cycles" / f"c{cycle}"

    def cycle_metrics(self, cycle: int) -> Path:
        """Headline scores only (what `dvc metrics show/diff` lists)."""
        return self.cycle_report(cycle) / "metrics.json"

    def cycle_scores(self, cycle: int) -> Path:
        """Every score of the cycle: per label, sanity steps, the model's metadata."""
        return self.cycle_report(cycle) / "scores.json"

    def cycle_roc(self, cycle: int) -> Path:
        """The ROC points per split and label (a DVC plot, and the report's ROC figure; pipeline/curves.py)."""
        return self.cycle_report(cycle) / "roc.csv"

    def cycle_pr(self, cycle: int) -> Path:
        """The precision-recall points per split and label (a DVC plot)."""
        return self.cycle_report(cycle) / "pr.csv"

    def cycle_calibration(self, cycle: int) -> Path:
        """The reliability diagram per split and label: mean predicted vs observed rate per bin (a DVC plot)."""
        return self.cycle_report(cycle) / "calibration.csv"

    def cycle_grid(self, cycle: int) -> Path:
        """Every label's heatmap and probability on the fixed test films (the report's before/after grid)."""
        return self.cycle_report(cycle) / "grid.npz"

    def cycle_cam_grid(self, cycle: int) -> Path:
        """The fixed test films' heatmaps, one column per label, as a picture (a DVC plot; the report shows it)."""
        return self.cycle_report(cycle) / "cam_grid.png"

    def resume_dir(self, cycle: int) -> Path:
        return self.models / ".resume" / f"c{cycle}"

    # saliency sanity checks (after the last evaluated cycle)
    @property
    def sanity(self) -> Path:
        return self.reports / "sanity.json"

    @property
    def sanity_twin(self) -> Path:
        """The permuted-label twin (stage `sanity_twin`): its checkpoint and, in model.json, how it scored."""
        return self.models / "sanity_twin"

    @property
    def sanity_resume(self) -> Path:
        """The twin's resume point while it trains (a killed run continues from it), like resume_dir(k)."""
        return self.models / ".resume" / "sanity_twin"

    # report
    @property
    def summary(self) -> Path:
        return self.reports / "summary.json"

    @property
    def latest(self) -> Path:
        """The served model: its checkpoint (relative to the root), cycle 0's, the scores, why it stopped."""
        return self.models / "latest.json"

    @property
    def report_html(self) -> Path:
        """The report a reader opens; it links figures/ and enhance/ relative to itself."""
        return self.reports / "index.html"

    @property
    def figures(self) -> Path:
        return self.reports / "figures"

    @property
    def trends(self) -> Path:
        """One row per cycle of the headline scores (`dvc plots show`)."""
        return self.reports / "trends.csv"

    def comparison(self, name: str) -> Path:
        """reports/<name>/: a comparison of runs (the enhancement policies, a real-data run), with its
        own summary.json and index.html."""
        return self.reports / name

    def comparison_summary(self, name: str) -> Path:
        return self.comparison(name) / "summary.json"

    def comparison_html(self, name: str) -> Path:
        return self.comparison(name) / "index.html"

    # outside the DVC graph
    @property
    def fresh_draw(self) -> Path:
        """Every cycle scored on a fresh phantom draw (`python -m pipeline.fresh_draw`)."""
        return self.reports / "fresh_draw.json"

    @property
    def benchmarks(self) -> Path:
        """What `make bench` measured (benchmarks/run.py and benchmarks/gpu.py update it)."""
        return self.reports / "benchmarks.json"
