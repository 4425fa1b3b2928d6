"""Synthetic frontal (PA) chest radiographs with exact ground truth: the default, offline dataset.

Why a phantom: the pipeline must score localisation, faithfulness and shortcut reliance against
pixel-exact truth (findings, anatomy, planted markers) without shipping a real dataset. Geometry
is in fractions of the image side, so every size 64..512 draws the same picture; all randomness
comes from the caller's generator (plus a per-patient seed for the vessel tree), so one seed
reproduces an image byte for byte.

Conventions: a PA film, so image left = patient right; side index 0 = image-left lung, 1 = right.
Intensity is attenuation-like: 0 = air (black), bone and dense tissue bright.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

from pipeline.data.labels import CANONICAL_LABELS

log = logging.getLogger(__name__)

PHANTOM_LABELS: tuple[str, ...] = ("Pneumonia", "Cardiomegaly", "Pleural Effusion", "Lung Lesion")
SHORTCUT_MARKERS: dict[str, str] = {"Pneumonia": "letter", "Cardiomegaly": "token"}
assert set(PHANTOM_LABELS) <= set(CANONICAL_LABELS) and set(SHORTCUT_MARKERS) <= set(PHANTOM_LABELS)

CTR_NORMAL = (0.385, 0.465)    # kept clear of 0.5 so one pixel of rasterisation never flips the label
CTR_ENLARGED = (0.53, 0.64)
AIR = 0.03
POSE_SHIFT, POSE_ROT_DEG = 0.025, 3.0
_BITS = {"lungs": 1, "heart": 2, "body": 4, "pneu0": 8, "pneu1": 16, "effusion": 32, "lesion": 64}


@dataclass(frozen=True)
class PatientAnatomy:
    """One patient's fixed anatomy (lengths in fractions of the image side). Follow-up images of a
    patient share it, so a patient-level split really keeps a patient's look out of the test set."""
    age_years: int
    sex: str                        # "M" | "F"
    body_hw: float                  # trunk half-width at chest level
    shoulder_y: float               # where the neck widens into the shoulders
    thorax_hw: float                # inner thoracic half-width (lateral lung edge)
    mediastinum_hw: float           # medial lung edge distance from the midline
    apex_y: tuple[float, float]     # lung apex height per side
    base_y: tuple[float, float]     # costophrenic angle height per side (the right one is higher)
    dome_h: tuple[float, float]     # diaphragm dome height above the costophrenic angle
    heart_ctr: float                # the patient's normal cardiothoracic ratio ("heart base size")
    heart_tilt: float               # heart long axis below horizontal (rad)
    heart_aspect: float
    hilum_y: float
    rib_phase: float                # vertical offset of the rib cage
    rib_spacing: float
    clavicle_y: float
    bone: float                     # bone contrast; falls with age
    texture_seed: int               # the vessel tree


def sample_patient(rng: np.random.Generator) -> PatientAnatomy:
    """Draw one patient; sizes vary within plausible adult ranges, women slightly narrower."""
    age = int(rng.integers(18, 91))
    sex = "F" if rng.random() < 0.5 else "M"
    body_hw = rng.uniform(0.36, 0.41) if sex == "F" else rng.uniform(0.39, 0.44)
    apex, base = rng.uniform(0.15, 0.19), rng.uniform(0.74, 0.80)
    return PatientAnatomy(
        age_years=age, sex=sex, body_hw=body_hw, shoulder_y=apex - rng.uniform(0.05, 0.08),
        thorax_hw=body_hw - rng.uniform(0.035, 0.055), mediastinum_hw=rng.uniform(0.045, 0.065),
        apex_y=(apex + rng.uniform(-0.01, 0.01), apex + rng.uniform(-0.01, 0.01)),
        base_y=(base - rng.uniform(0.01, 0.04), base),
        dome_h=(rng.uniform(0.07, 0.1), rng.uniform(0.06, 0.09)),
        heart_ctr=rng.uniform(0.40, 0.45), heart_tilt=rng.uniform(0.35, 0.6),
        heart_aspect=rng.uniform(1.2, 1.4), hilum_y=rng.uniform(0.38, 0.44),
        rib_phase=rng.uniform(-0.015, 0.015), rib_spacing=rng.uniform(0.054, 0.062),
        clavicle_y=rng.uniform(0.17, 0.21), bone=float(np.clip(1.15 - 0.006 * (age - 18), 0.65, 1.15)),
        texture_seed=int(rng.integers(2**31)),
    )


@dataclass
class PhantomImage:
    image: np.ndarray                           # uint8 (size, size)
    lungs: np.ndarray                           # bool, both lung fields (overlap the heart medially)
    heart: np.ndarray                           # bool, heart silhouette
    body: np.ndarray                            # bool, body outline
    findings: dict[str, bool]                   # one entry per PHANTOM_LABELS
    finding_masks: dict[str, np.ndarray]        # bool mask per positive finding
    boxes: list[tuple[str, int, int, int, int]]  # (label, x, y, w, h), one per finding region
    markers: dict[str, bool]                    # keys = SHORTCUT_MARKERS
    marker_masks: dict[str, np.ndarray]         # keys = SHORTCUT_MARKERS; all False when not drawn
    ctr: float                                  # cardiothoracic ratio as drawn


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates as a (1, S) row and an (S, 1) column, in fractions of the side."""
    c = ((np.arange(size, dtype=np.float32) + 0.5) / size)
    return c[None, :], c[:, None]


def _lung_outline(p: PatientAnatomy, s: int) -> tuple[np.ndarray, np.ndarray]:
    """Closed lung outline (u, v) and its diaphragm part (lateral -> medial) for side s."""
    sgn = -1.0 if s == 0 else 1.0
    wm, wl, ya, ycp, dh = p.mediastinum_hw, p.thorax_hw, p.apex_y[s], p.base_y[s], p.dome_h[s]
    wap = wm + 0.4 * (wl - wm)
    tau = np.linspace(0, 1, 16)                  # lateral contour: rounded apex, widest low down
    wall = np.stack([wap + (wl - wap) * np.sin(np.pi / 2 * np.minimum(tau / 0.75, 1)) ** 0.55
                     - 0.015 * np.clip((tau - 0.75) / 0.25, 0, 1) ** 2, ya + (ycp - ya) * tau], 1)
    q = np.linspace(0, 1, 14)[1:]                # diaphragm dome, sharp costophrenic angle
    lift = np.where(q < 0.55, np.sin(np.pi / 2 * q / 0.55), 1 - 0.4 * ((q - 0.55) / 0.45) ** 2)
    dome = np.stack([wall[-1, 0] - (wall[-1, 0] - wm) * q, ycp - dh * lift], 1)
    ymb, ytop = ycp - 0.6 * dh, ya + 0.1
    r = np.linspace(0, 1, 6)[1:]
    medial = np.stack([wm + 0.008 * np.sin(np.pi * r), ymb - (ymb - ytop) * r], 1)
    t2 = np.linspace(0, np.pi / 2, 8)[1:-1]
    cap = np.stack([wap - (wap - wm) * np.cos(t2), ytop - (ytop - ya) * np.sin(t2)], 1)
    pts = np.concatenate([wall, dome, medial, cap])
    diaphragm = np.concatenate([wall[-1:], dome])
    for a in (pts, diaphragm):
        a[:, 0] = 0.5 + sgn * a[:, 0]
    return pts, diaphragm


def _walk(rng: np.random.Generator, start: np.ndarray, phi: np.ndarray, n: int, step: float,
          sgn: float) -> tuple[np.ndarray, np.ndarray]:
    """Random-walk polylines (B, n+1, 2) from `start` (B, 2) heading `phi` (B,), drifting down."""
    ang = phi[:, None] + np.cumsum(rng.normal(0, 0.2, (len(phi), n)), 1)
    steps = step * np.stack([sgn * np.cos(ang), np.sin(ang) + 0.2], -1)
    return np.concatenate([start[:, None], start[:, None] + np.cumsum(steps, 1)], 1), ang


@lru_cache(maxsize=512)
def _vessel_tree(p: PatientAnatomy) -> tuple[np.ndarray, list[np.ndarray]]:
    """Branching polylines radiating from each hilum (normalised coords): thick trunks, thin
    branches. Patient-level and cached: one patient always shows the same vascular pattern."""
    rng = np.random.default_rng(p.texture_seed)
    trunks, branches = [], []
    for sgn in (-1.0, 1.0):
        nb = 8
        hil = np.array([0.5 + sgn * (p.mediastinum_hw + 0.035), p.hilum_y])
        phi = np.linspace(-1.3, 1.1, nb) + rng.normal(0, 0.08, nb)
        main, ang = _walk(rng, np.repeat(hil[None], nb, 0), phi, 7, 0.032, sgn)
        trunks.append(main)
        k = rng.integers(2, 6, 2 * nb)
        b = np.repeat(np.arange(nb), 2)
        sub, sang = _walk(rng, main[b, k], ang[b, k - 1] + rng.choice([-1, 1], 2 * nb) * rng.uniform(
            0.4, 0.8, 2 * nb), 4, 0.022, sgn)
        branches.append(sub)
        k2 = rng.integers(1, 4, 2 * nb)
        twig, _ = _walk(rng, sub[np.arange(2 * nb), k2], sang[np.arange(2 * nb), k2 - 1] + rng.choice(
            [-1, 1], 2 * nb) * 0.6, 3, 0.016, sgn)
        branches.append(twig)
    return np.concatenate(trunks), branches


def _fixed(pts: np.ndarray, size: int) -> np.ndarray:
    """Normalised points -> cv2 fixed-point (shift=4) pixel coordinates (pixel centres at .0)."""
    return np.round((pts * size - 0.5) * 16).astype(np.int32)


def _blur(a: np.ndarray, sigma_px: float) -> np.ndarray:
    return cv2.GaussianBlur(a, (0, 0), max(sigma_px, 0.3))


def _box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    ys, xs = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    if not len(xs):
        return None
    return int(xs[0]), int(ys[0]), int(xs[-1] - xs[0] + 1), int(ys[-1] - ys[0] + 1)


def _extent(mask: np.ndarray) -> int:
    cols = np.nonzero(mask.any(0))[0]
    return int(cols[-1] - cols[0] + 1) if len(cols) else 0


def _pick(rng: np.random.Generator, mask: np.ndarray) -> tuple[int, int]:
    """A uniformly random (row, col) of a non-empty mask."""
    idx = np.flatnonzero(mask)
    r, c = divmod(int(idx[rng.integers(len(idx))]), mask.shape[1])
    return r, c


def _place(glyph: np.ndarray, forbidden: np.ndarray, y: int, x: int, dy: int, dx: int) -> np.ndarray:
    """Put a marker glyph at (y, x), sliding it by (dy, dx) towards its corner until it is clear of
    the patient: real laterality markers and tokens sit on the detector, never over the body."""
    size, (h, w) = forbidden.shape[0], glyph.shape
    out = np.zeros_like(forbidden)
    for _ in range(size):
        y, x = int(np.clip(y, 0, size - h)), int(np.clip(x, 0, size - w))
        if not (forbidden[y:y + h, x:x + w] & glyph).any():
            break
        y, x = y + dy, x + dx
    out[y:y + h, x:x + w] = glyph
    if (out & forbidden).any():
        log.warning("phantom marker overlaps the body at size %d; clipping it", size)
        out &= ~forbidden
    return out


def letter_glyph(size: int, height: float = 0.09, letter: str = "R") -> np.ndarray:
    """A laterality-marker-like letter, `height` of the image side tall, as a tight bool mask; the
    same pixels every time for a given size (the phantom's marker and the shortcut audit's)."""
    th = max(1, round(size / 64))
    scale = height * size / cv2.getTextSize(letter, cv2.FONT_HERSHEY_SIMPLEX, 1.0, th)[0][1]
    (tw, tht), _ = cv2.getTextSize(letter, cv2.FONT_HERSHEY_SIMPLEX, scale, th)
    patch = np.zeros((tht + 2 * th + 2, tw + 2 * th + 2), np.uint8)
    cv2.putText(patch, letter, (th + 1, tht + th + 1), cv2.FONT_HERSHEY_SIMPLEX, scale, 255, th)
    g = patch > 0
    return g[np.ix_(g.any(1), g.any(0))]


def _markers(rng: np.random.Generator, size: int, markers: dict[str, bool], forbidden: np.ndarray):
    """Shortcut markers: a letter top-left ("R", laterality-marker-like), a token top-right."""
    masks = {lab: np.zeros((size, size), bool) for lab in SHORTCUT_MARKERS}
    for lab, kind in SHORTCUT_MARKERS.items():
        if not markers.get(lab, False):
            continue
        jy, jx = (int(round(rng.uniform(0.015, 0.045) * size)) for _ in range(2))
        if kind == "letter":
            masks[lab] = _place(letter_glyph(size), forbidden, jy, jx, -1, -1)
        else:
            side = max(3, round(0.06 * size))
            masks[lab] = _place(np.ones((side, side), bool), forbidden, jy, size - side - jx, -1, 1)
    return masks


def render(rng: np.random.Generator, size: int, patient: PatientAnatomy,
           findings: dict[str, bool], markers: dict[str, bool],
           opacity_contrast: float = 1.0) -> PhantomImage:
    """Draw one radiograph of `patient` with the requested findings and shortcut markers.

    Anatomy and findings are drawn in a canonical frame, then image and masks share one small
    rigid pose warp; markers, blur and quantum noise come last, as on a detector.
    `opacity_contrast` scales the two focal opacities (pneumonia, nodule); the effusion is fluid and
    the heart size is geometric, so neither depends on it.
    """
    bad = (set(findings) - set(PHANTOM_LABELS)) | (set(markers) - set(SHORTCUT_MARKERS))
    if bad:
        raise ValueError(f"phantom: unknown finding/marker {sorted(bad)}; findings: {PHANTOM_LABELS}, "
                         f"markers: {sorted(SHORTCUT_MARKERS)}")
    if not 32 <= size <= 2048:
        raise ValueError(f"phantom size {size} outside 32..2048")
    p, S, px = patient, size, size / 128.0          # px: one pixel at the 128-px reference size
    f = {lab: bool(findings.get(lab, False)) for lab in PHANTOM_LABELS}
    u, v = _grid(S)
    dx = np.abs(u - 0.5)

    # -- anatomy masks (canonical frame) -------------------------------------------------------
    sp = np.clip((v - p.shoulder_y) / 0.3, 0, 1)      # sloping shoulders leave the top corners as air
    hw = 0.085 + (p.body_hw - 0.085) * np.sin(np.pi / 2 * sp) ** 0.6 + 0.03 * np.clip(v - 0.55, 0, None)
    body_soft = np.clip((hw - dx) * S + 0.5, 0, 1)
    body = body_soft > 0.5
    side = np.zeros((S, S), np.uint8)
    diaph_u, diaph_v = [], []
    for s in (0, 1):
        pts, dia = _lung_outline(p, s)
        cv2.fillPoly(side, [_fixed(pts, S)], s + 1, cv2.LINE_8, shift=4)
        diaph_u.append(dia[:, 0] if s == 0 else dia[::-1, 0])
        diaph_v.append(dia[:, 1] if s == 0 else dia[::-1, 1])
    lungs = side > 0
    thorax_px = _extent(lungs)
    ctr_target = rng.uniform(*CTR_ENLARGED) if f["Cardiomegaly"] else \
        float(np.clip(p.heart_ctr + rng.normal(0, 0.01), *CTR_NORMAL))
    W = ctr_target * thorax_px / S
    asp = p.heart_aspect * (ctr_target / p.heart_ctr) ** 0.5   # Python floats keep arrays float32
    c, s_ = float(np.cos(p.heart_tilt)), float(np.sin(p.heart_tilt))
    a = (W / 2) / (c * c + s_ * s_ / asp ** 2) ** 0.5
    b = a / asp
    hy = ((a * s_) ** 2 + (b * c) ** 2) ** 0.5
    hcx = 0.5 + 0.18 * W                      # two thirds of the heart left of the spine
    hcy = float(max(diaph_v[0][-1], diaph_v[1][0])) + 0.015 - hy
    xr, yr = u - hcx, v - hcy
    e = ((xr * c + yr * s_) / a) ** 2 + ((yr * c - xr * s_) / b) ** 2
    heart = e <= 1
    ctr = _extent(heart) / max(thorax_px, 1)
    dia_v = np.interp(u[0], np.concatenate([[0.0], *diaph_u, [1.0]]),
                      np.concatenate([[diaph_v[0][0]], *diaph_v, [diaph_v[1][-1]]])).astype(np.float32)[None, :]

    # -- findings (canonical frame) -------------------------------------------------------------
    fm = {k: np.zeros((S, S), bool) for k in ("pneu0", "pneu1", "effusion", "lesion")}
    add = np.zeros((S, S), np.float32)
    free = lungs & ~heart
    if f["Pneumonia"]:
        sides = (0, 1) if rng.random() < 0.15 else (int(rng.integers(2)),)
        rough = cv2.resize(rng.random((6, 6)).astype(np.float32), (S, S), interpolation=cv2.INTER_CUBIC)
        for s in sides:
            r0, c0 = _pick(rng, free & (side == s + 1))
            fld = np.zeros((S, S), np.float32)
            for _ in range(int(rng.integers(3, 7))):
                cy, cx = (r0 + 0.5) / S + rng.normal(0, 0.035), (c0 + 0.5) / S + rng.normal(0, 0.035)
                sig = rng.uniform(0.022, 0.05)
                fld += rng.uniform(0.6, 1.0) * np.exp(-((u - cx) ** 2 + (v - cy) ** 2) / (2 * sig * sig))
            fld = np.clip(fld, 0, 1.2) * (0.55 + 0.9 * rough)
            m = (fld > 0.45) & (side == s + 1)
            m[r0, c0] = True
            fm[f"pneu{s}"] = m
            add += rng.uniform(0.10, 0.15) * opacity_contrast * np.clip(fld, 0, 1) * (side == s + 1)
    if f["Pleural Effusion"]:
        s = int(rng.integers(2))
        w = np.clip((np.abs(u - 0.5) - p.mediastinum_hw) / (p.thorax_hw - p.mediastinum_hw), 0, 1)
        level = p.base_y[s] - rng.uniform(0.07, 0.16) - rng.uniform(0.04, 0.09) * w ** 2
        m = (side == s + 1) & (v > level)
        fm["effusion"] = m
        add += 0.2 * _blur(m.astype(np.float32), 1.2 * px) * (0.85 + 0.3 * np.clip((v - level) / 0.1, 0, 1))
    if f["Lung Lesion"]:
        r = max(1.6, rng.uniform(0.02, 0.04) * S)
        dist = cv2.distanceTransform(free.astype(np.uint8), cv2.DIST_L2, 3)
        ok = dist > r + 1
        r0, c0 = _pick(rng, ok if ok.any() else dist >= dist.max())
        d = np.sqrt((u * S - c0 - 0.5) ** 2 + (v * S - r0 - 0.5) ** 2)
        fm["lesion"] = (d <= r) & lungs
        add += rng.uniform(0.12, 0.18) * opacity_contrast * np.clip(r - d + 0.5, 0, 1)

    # -- intensity: soft tissue, lungs, mediastinum, bone, vessels ---------------------------------
    thick = np.sqrt(np.clip(1 - (dx / hw) ** 2, 0, 1)) * np.sqrt(hw / p.body_hw)   # path length
    img = AIR + body_soft * (0.08 + 0.36 * thick)
    below = np.clip((v - dia_v) * S / (3 * px), 0, 1)      # under the diaphragm: liver / spleen
    img += 0.04 * body_soft * below
    heart_soft = np.clip((1 - e) * a * S / (4 * px), 0, 1)
    lung_soft = _blur((lungs * (1 - 0.7 * heart_soft)).astype(np.float32), 0.9 * px)
    img -= lung_soft * 0.3 * (0.7 + 0.3 * np.clip((v - p.apex_y[0]) / 0.15, 0, 1))
    img += 0.1 * np.exp(-(dx / 0.085) ** 4) * np.clip((v - p.shoulder_y) / 0.05, 0, 1)  # mediastinum
    img += 0.06 * np.clip((1 - ((u - 0.56) ** 2 + (v - p.hilum_y + 0.1) ** 2) / 0.035 ** 2) * 3, 0, 1)
    img += 0.11 * heart_soft * (1 - 0.7 * below)        # its lower border merges with the diaphragm
    img -= 0.05 * np.exp(-(dx / 0.014) ** 2) * np.clip((0.4 - v) / 0.03, 0, 1)  # trachea
    if p.sex == "F":
        for sgn in (-1, 1):
            eb = ((u - 0.5 - sgn * 0.24) / 0.16) ** 2 + ((v - 0.68) / 0.11) ** 2   # breast shadows
            img += 0.035 * np.clip((1 - eb) * 8, 0, 1) * np.clip((v - 0.57) / 0.11, 0, 1) * body_soft
    bones = np.zeros((S, S), np.uint8)
    t = np.linspace(0, 1, 12)[None, :]
    k = np.arange(10)[:, None]
    y0 = p.apex_y[0] - 0.035 + p.rib_phase + k * p.rib_spacing
    post_v = y0 - 0.035 * np.sin(np.pi * t / 1.3) + 0.13 * t ** 2.2
    post_w = 0.03 + (p.thorax_hw - 0.015) * t + 0 * k
    ant_v = y0[:6] + 0.1 + 0.1 * t + 0.02 * t ** 2
    ant_w = p.thorax_hw + 0.01 - (p.thorax_hw - 0.1) * t + 0 * k[:6]
    clav_v = p.clavicle_y + 0.03 - 0.07 * t + 0.012 * np.sin(2 * np.pi * t)
    for ws, vs, val, wpx in ((ant_w, ant_v, 60, 2.6), (post_w, post_v, 150, 2.4), (0.035 + 0.28 * t, clav_v, 255, 3.6)):
        lines = np.concatenate([np.stack([0.5 + sgn * ws, vs], -1) for sgn in (-1, 1)])
        cv2.polylines(bones, list(_fixed(lines, S)), False, val, max(1, round(wpx * px)), cv2.LINE_AA, 4)
    bone = _blur(bones.astype(np.float32) * (1 / 255), 0.6 * px)
    img += p.bone * 0.13 * bone * body_soft * (0.5 + 0.5 * lung_soft)
    disc = np.clip((np.cos(2 * np.pi * (v - p.rib_phase) / 0.048) - 0.75) / 0.25, 0, 1)
    img += p.bone * 0.1 * np.sqrt(np.clip(1 - (dx / 0.034) ** 2, 0, 1)) * (1 - 0.4 * disc) * body_soft
    ves = np.zeros((S, S), np.uint8)
    trunks, branches = _vessel_tree(p)
    cv2.polylines(ves, list(_fixed(trunks, S)), False, 255, max(1, round(1.8 * px)), cv2.LINE_AA, 4)
    for br in branches:
        cv2.polylines(ves, list(_fixed(br, S)), False, 170, max(1, round(1.1 * px)), cv2.LINE_AA, 4)
    hil = np.exp(-(((dx - p.mediastinum_hw - 0.04) / 0.03) ** 2 + ((v - p.hilum_y) / 0.05) ** 2))
    img += (0.08 * _blur(ves.astype(np.float32) * (1 / 255), 0.5 * px) + 0.07 * hil) * lung_soft
    img += add

    # -- pose: one rigid warp for image and masks ----------------------------------------------
    M = cv2.getRotationMatrix2D((S / 2 - 0.5, S / 2 - 0.5), rng.uniform(-POSE_ROT_DEG, POSE_ROT_DEG), 1.0)
    M[:, 2] += rng.uniform(-POSE_SHIFT, POSE_SHIFT, 2) * S
    img = cv2.warpAffine(img.astype(np.float32), M, (S, S), flags=cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_REPLICATE)
    packed = (lungs * _BITS["lungs"] | heart * _BITS["heart"] | body * _BITS["body"]).astype(np.uint8)
    for k, m in fm.items():
        packed |= (m * _BITS[k]).astype(np.uint8)
    packed = cv2.warpAffine(packed, M, (S, S), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_REPLICATE)
    W_ = {k: (packed & bit) > 0 for k, bit in _BITS.items()}

    # -- detector: markers, exposure, blur, quantum noise --------------------------------------
    anat = (W_["body"] | W_["lungs"] | W_["heart"]).astype(np.uint8)
    forbidden = cv2.dilate(anat, np.ones((3, 3), np.uint8), iterations=max(1, round(px))) > 0
    mmasks = _markers(rng, S, markers, forbidden)
    for m in mmasks.values():
        if m.any():
            img[m] = rng.uniform(0.9, 1.0)
    img = img * rng.uniform(0.98, 1.02) + rng.uniform(-0.005, 0.005)
    img = _blur(img, 0.35 + S / 512)
    noise = _blur(rng.standard_normal((S, S), dtype=np.float32), 0.4)
    img += noise * (0.018 * np.exp(0.9 * np.clip(img, 0, 1)))
    image = np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)

    masks = {"Pneumonia": W_["pneu0"] | W_["pneu1"], "Cardiomegaly": W_["heart"],
             "Pleural Effusion": W_["effusion"], "Lung Lesion": W_["lesion"]}
    parts = {"Pneumonia": [W_["pneu0"], W_["pneu1"]]}
    finding_masks, boxes = {}, []
    for lab in PHANTOM_LABELS:
        if not f[lab]:
            continue
        finding_masks[lab] = masks[lab]
        for part in parts.get(lab, [masks[lab]]):
            bx = _box(part)
            if bx is not None:
                boxes.append((lab, *bx))
    return PhantomImage(image=image, lungs=W_["lungs"], heart=W_["heart"], body=W_["body"], findings=f,
                        finding_masks=finding_masks, boxes=boxes,
                        markers={lab: bool(m.any()) for lab, m in mmasks.items()},
                        marker_masks=mmasks, ctr=float(ctr))
