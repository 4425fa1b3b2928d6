"""The one canonical label list and each label's anatomy.

Every source maps its findings into these names; a label a source does not provide is NaN in the
manifest and is excluded from loss and metrics. The anatomy tells localisation scores and the
enhancement where a label's evidence may legitimately live (the heart lies outside the lungs, so a
lungs-only mask would erase the evidence for cardiomegaly).
"""
from __future__ import annotations

CANONICAL_LABELS: tuple[str, ...] = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)

ANATOMY_STRUCTURES: tuple[str, ...] = ("lungs", "heart")

# Which anatomy each label's evidence lives in. "both" = lungs ∪ heart.
LABEL_ANATOMY: dict[str, str] = {
    "No Finding": "both",
    "Enlarged Cardiomediastinum": "heart",
    "Cardiomegaly": "heart",
    "Lung Opacity": "lungs",
    "Lung Lesion": "lungs",
    "Edema": "lungs",
    "Consolidation": "lungs",
    "Pneumonia": "lungs",
    "Atelectasis": "lungs",
    "Pneumothorax": "lungs",
    "Pleural Effusion": "lungs",
    "Pleural Other": "lungs",
    "Fracture": "both",
    "Support Devices": "both",
}


def anatomy_of(label: str) -> str:
    """'lungs', 'heart' or 'both' for a canonical label."""
    if label not in CANONICAL_LABELS:
        raise ValueError(f"unknown label {label!r}; canonical labels: {', '.join(CANONICAL_LABELS)}")
    return LABEL_ANATOMY[label]
