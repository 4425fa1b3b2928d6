"""The phantom is the default dataset: its pixels, masks, boxes and markers must agree exactly."""
import cv2
import numpy as np
import pytest

from pipeline.data import phantom
from pipeline.data.labels import CANONICAL_LABELS, anatomy_of

LABELS = phantom.PHANTOM_LABELS


def _case(seed: int, size: int = 64, findings=None, markers=None, contrast: float = 1.0):
    rng = np.random.default_rng(seed)
    pat = phantom.sample_patient(rng)
    if findings is None:
        findings = {lab: bool(rng.random() < 0.5) for lab in LABELS}
    if markers is None:
        markers = {lab: bool(rng.random() < 0.5) for lab in phantom.SHORTCUT_MARKERS}
    return phantom.render(rng, size, pat, findings, markers, opacity_contrast=contrast), findings, markers


def test_api_constants():
    assert LABELS == ("Pneumonia", "Cardiomegaly", "Pleural Effusion", "Lung Lesion")
    assert set(LABELS) <= set(CANONICAL_LABELS)
    assert phantom.SHORTCUT_MARKERS == {"Pneumonia": "letter", "Cardiomegaly": "token"}


def test_same_seed_same_bytes_different_seed_differs():
    a, _, _ = _case(11, 96)
    b, _, _ = _case(11, 96)
    c, _, _ = _case(12, 96)
    assert a.image.tobytes() == b.image.tobytes() and a.ctr == b.ctr and a.boxes == b.boxes
    for name in ("lungs", "heart", "body"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    for lab in a.finding_masks:
        np.testing.assert_array_equal(a.finding_masks[lab], b.finding_masks[lab])
    for lab in a.marker_masks:
        np.testing.assert_array_equal(a.marker_masks[lab], b.marker_masks[lab])
    assert a.image.tobytes() != c.image.tobytes()


def test_patient_is_reusable_and_images_of_one_patient_differ():
    pat = phantom.sample_patient(np.random.default_rng(5))
    f = {lab: False for lab in LABELS}
    m = {lab: False for lab in phantom.SHORTCUT_MARKERS}
    x = phantom.render(np.random.default_rng(1), 64, pat, f, m)
    y = phantom.render(np.random.default_rng(2), 64, pat, f, m)
    assert x.image.tobytes() != y.image.tobytes()          # pose and noise differ
    assert abs(int(x.lungs.sum()) - int(y.lungs.sum())) < 0.1 * x.lungs.sum()  # same anatomy
    assert pat.sex in ("M", "F") and isinstance(pat.age_years, int)


@pytest.mark.parametrize("size", [64, 128, 200, 512])
def test_shapes_and_dtypes(size):
    img, _, _ = _case(3, size)
    assert img.image.dtype == np.uint8 and img.image.shape == (size, size)
    for m in (img.lungs, img.heart, img.body, *img.finding_masks.values(), *img.marker_masks.values()):
        assert m.dtype == bool and m.shape == (size, size)
    assert set(img.findings) == set(LABELS) and set(img.markers) == set(phantom.SHORTCUT_MARKERS)


def test_ground_truth_consistency_over_random_cases():
    seen_pos, seen_ctr = set(), []
    for seed in range(50):
        img, findings, markers = _case(100 + seed, 64 if seed % 2 else 128)
        S = img.image.shape[0]
        assert img.lungs.any() and img.heart.any() and img.body.any()
        assert (img.lungs & img.body).sum() >= 0.97 * img.lungs.sum()
        assert (img.heart & img.body).sum() >= 0.97 * img.heart.sum()
        assert img.findings == findings
        assert (img.ctr > 0.5) == findings["Cardiomegaly"], (seed, img.ctr)
        seen_ctr.append(img.ctr)
        boxed = [b[0] for b in img.boxes]
        assert set(img.finding_masks) == {lab for lab in LABELS if findings[lab]}
        for lab in LABELS:
            if not findings[lab]:
                assert lab not in boxed
                continue
            seen_pos.add(lab)
            mask = img.finding_masks[lab]
            assert mask.any(), (seed, lab)
            boxes = [b for b in img.boxes if b[0] == lab]
            assert 1 <= len(boxes) <= (2 if lab == "Pneumonia" else 1)
            union = np.zeros_like(mask)
            for _, x, y, w, h in boxes:
                assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= S and y + h <= S
                box = np.zeros_like(mask)
                box[y:y + h, x:x + w] = True
                assert (mask & box).any()
                if anatomy_of(lab) == "lungs":
                    assert (box & img.lungs).any()
                union |= box
            assert not (mask & ~union).any(), (seed, lab)       # boxes cover the whole mask
            if anatomy_of(lab) == "lungs":
                assert (mask & img.lungs).sum() >= 0.9 * mask.sum()
        anat = img.body | img.lungs | img.heart
        for lab, drawn in img.markers.items():
            assert drawn == markers[lab]
            m = img.marker_masks[lab]
            assert m.any() == drawn
            assert not (m & anat).any(), (seed, lab)
    assert seen_pos == set(LABELS)
    assert min(abs(c - 0.5) for c in seen_ctr) > 0.01


def test_lungs_darker_than_heart_and_air_darkest():
    for seed in range(10):
        img, _, _ = _case(300 + seed, 128)
        im = img.image.astype(float)
        air = ~cv2.dilate(img.body.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
        air &= ~(img.marker_masks["Pneumonia"] | img.marker_masks["Cardiomegaly"])
        lungs_only = img.lungs & ~img.heart
        assert im[lungs_only].mean() + 20 < im[img.heart].mean()
        assert im[air].mean() + 20 < im[lungs_only].mean()


def test_markers_are_bright_in_their_corners():
    for seed in range(10):
        f = {lab: False for lab in LABELS}
        img, _, _ = _case(400 + seed, 64, findings=f, markers={"Pneumonia": True, "Cardiomegaly": True})
        letter, token = img.marker_masks["Pneumonia"], img.marker_masks["Cardiomegaly"]
        ys, xs = np.nonzero(letter)
        assert ys.max() < 16 and xs.max() < 20          # the top-left zone the enhancement tests use
        ys, xs = np.nonzero(token)
        assert ys.max() < 16 and xs.min() >= 44
        for m in (letter, token):
            assert img.image[m].mean() > 150
    none, _, _ = _case(1, 64, markers={"Pneumonia": False, "Cardiomegaly": False})
    assert not any(none.markers.values()) and not any(m.any() for m in none.marker_masks.values())


def test_opacity_contrast_scales_pneumonia():
    f = {lab: lab == "Pneumonia" for lab in LABELS}
    m = {lab: False for lab in phantom.SHORTCUT_MARKERS}
    diffs = []
    for c in (0.0, 1.0, 2.0):
        img, _, _ = _case(21, 128, findings=f, markers=m, contrast=c)
        mask = img.finding_masks["Pneumonia"]
        ring = img.lungs & ~mask & ~img.heart
        diffs.append(img.image[mask].mean() - img.image[ring].mean())
    assert diffs[0] < diffs[1] < diffs[2]


def test_unknown_keys_are_refused():
    pat = phantom.sample_patient(np.random.default_rng(0))
    with pytest.raises(ValueError, match="unknown"):
        phantom.render(np.random.default_rng(0), 64, pat, {"Pneumothorax": True}, {})


def test_sample_png_roundtrip(tmp_path):
    img, _, _ = _case(2, 128)
    path = tmp_path / "phantom.png"
    assert cv2.imwrite(str(path), img.image)
    np.testing.assert_array_equal(cv2.imread(str(path), cv2.IMREAD_GRAYSCALE), img.image)
