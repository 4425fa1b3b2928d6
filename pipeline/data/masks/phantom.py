"""Phantom radiographs with exact lung and heart masks: the U-Net's teacher when a real dataset comes
without mask datasets (a fallback with a domain gap: give Montgomery/Shenzhen/JSRT for real work)."""
from __future__ import annotations

from typing import Iterator

import numpy as np

from pipeline.config import DataParams, PhantomParams
from pipeline.data import phantom
from pipeline.data.masks.common import MaskRecord
from pipeline.data.record import encode_anatomy


def mask_records(n: int, p: DataParams, seed: int, known: tuple[str, ...] = ("lungs", "heart")
                 ) -> Iterator[MaskRecord]:
    prevalence = PhantomParams().prevalence
    for k in range(n):
        rng = np.random.default_rng([seed, 7919, k])
        patient = phantom.sample_patient(rng)
        findings = {lab: bool(rng.random() < prevalence.get(lab, 0.0)) for lab in phantom.PHANTOM_LABELS}
        img = phantom.render(rng, p.image_size, patient, findings, {})
        yield MaskRecord(img.image, encode_anatomy(img.lungs, img.heart), known, f"phantom:{k}", f"phantom://{seed}/{k}")
