"""Lung and heart mask datasets the anatomy U-Net learns from (one module per dataset).

Each module has `mask_records(root, p: DataParams) -> Iterator[MaskRecord | Quarantined]`, reading
through the same decoder and square fit as the classification sources, so masks and images line up
with prepared images of any dataset.
"""
