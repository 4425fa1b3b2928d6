"""Every artefact path of a project, relative to its root. dvc.yaml mirrors these."""
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

    # prepared data
    @property
    def prepared(self) -> Path:
        return self.root / "data" / "prepared"

    @property
    def prepared_manifest(self) -> Path:
        return self.prepared / "manifest.parquet"

    @property
    def prepared_images(self) -> Path:
        return self.prepared / "images"

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
        return self.root / "reports" / "quarantine.csv"

    # segmentation
    @property
    def predicted_masks(self) -> Path:
        return self.root / "data" / "segment" / "masks"

    @property
    def masks(self) -> Path:
        return self.audit / "masks" if self.audit_on else self.predicted_masks

    @property
    def unet(self) -> Path:
        return self.root / "models" / "unet"

    @property
    def segment_report(self) -> Path:
        return self.root / "reports" / "segment"

    # shortcut audit
    @property
    def audit(self) -> Path:
        return self.root / "data" / "audit"

    @property
    def audit_markers(self) -> Path:
        """One row per film of the audited set: where the marker is and whether it is drawn."""
        return self.audit / "markers.parquet"

    @property
    def audit_summary(self) -> Path:
        return self.audit / "audit.json"

    # per cycle
    def model(self, cycle: int) -> Path:
        return self.root / "models" / f"c{cycle}"

    def cams(self, cycle: int) -> Path:
        return self.root / "data" / "cams" / f"c{cycle}"

    def enhanced(self, cycle: int) -> Path:
        return self.root / "data" / "enhanced" / f"c{cycle}"

    def enhanced_train(self, cycle: int) -> Path:
        return self.enhanced(cycle) / "train"

    def enhanced_val(self, cycle: int) -> Path:
        """Present for label-blind policies: the val images under the same transform."""
        return self.enhanced(cycle) / "val"

    def cycle_report(self, cycle: int) -> Path:
        return self.root / "reports" / "cycles" / f"c{cycle}"

    def cycle_metrics(self, cycle: int) -> Path:
        """Headline scores only (what `dvc metrics show/diff` lists)."""
        return self.cycle_report(cycle) / "metrics.json"

    def cycle_scores(self, cycle: int) -> Path:
        """Every score of the cycle: per label, sanity steps, the model's metadata."""
        return self.cycle_report(cycle) / "scores.json"

    def resume_dir(self, cycle: int) -> Path:
        return self.root / "models" / ".resume" / f"c{cycle}"

    # saliency sanity checks (after the last evaluated cycle)
    @property
    def sanity(self) -> Path:
        return self.root / "reports" / "sanity.json"

    @property
    def sanity_resume(self) -> Path:
        """The permuted-label twin's training state, kept: a rerun with the same twin skips its training."""
        return self.root / "models" / ".resume" / "sanity"

    # report
    @property
    def summary(self) -> Path:
        return self.root / "reports" / "summary.json"

    @property
    def latest(self) -> Path:
        return self.root / "models" / "latest.json"
