"""What every real-dataset adapter shares: reading an image into the prepared square, mapping boxes
the same way, pseudonymous ids, and patient-level splits.

An adapter is a module with `records(params, salt) -> Iterator[Record | Quarantined | Pending]`: it
lists files and labels, and defers the pixels to `image_record` (a Pending that `read_image`s
wherever prepare runs it), so every source fits, crops and scales images (and their boxes)
identically, and a file that cannot be read becomes a `Quarantined` row instead of an error.
"""
from __future__ import annotations

import logging
from collections import Counter
import math
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import cv2
import numpy as np

from pipeline.config import DataParams
from pipeline.data.decode import Decoded, DecodeError, decode, salted_hash
from pipeline.data.manifest import patient_split
from pipeline.data.record import Pending, Quarantined, Record

log = logging.getLogger(__name__)

MAX_AGE = 120  # sources hold a few ages like 148 or 413: typing errors, left unknown
SALT_ENV = "CXR_ID_SALT"
SALT_FILE = Path(".cxr") / "id_salt"


def id_salt(project_root: str | os.PathLike = ".") -> str:
    """The secret that pseudonymises patient ids: $CXR_ID_SALT, else a random one kept (chmod 600)
    in <project>/.cxr/id_salt, created on first use. Never written to outputs."""
    if os.environ.get(SALT_ENV):
        return os.environ[SALT_ENV]
    path = Path(project_root) / SALT_FILE
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(16))
    return path.read_text().strip()


def pseudonym(value: str, salt: str) -> str:
    return salted_hash(str(value), salt)


def age_years(value) -> float | None:
    """A DICOM age string ("045Y", "006M", "045") or a number -> years; None when missing or implausible."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([DWMYdwmy]?)\s*", str(value))
    if not m:
        return None
    n = float(m.group(1))
    years = n * {"": 1, "Y": 1, "M": 1 / 12, "W": 7 / 365.25, "D": 1 / 365.25}[m.group(2).upper()]
    if years > MAX_AGE:
        return None
    return float(int(years)) if m.group(2).upper() in ("", "Y") else round(years, 2)


def sex_of(value) -> str | None:
    s = str(value or "").strip().upper()[:1]
    return s if s in ("M", "F") else None


@dataclass(frozen=True)
class Fit:
    """How original pixel (x, y) maps into the prepared square: trim, then scale and offset."""
    x0: float
    y0: float
    sx: float
    sy: float
    ox: float
    oy: float
    size: int

    def box(self, x: float, y: float, w: float, h: float) -> tuple[int, int, int, int] | None:
        """An original-pixel box in prepared pixels, clipped to the image; None if nothing is left."""
        x1, y1 = (x - self.x0) * self.sx + self.ox, (y - self.y0) * self.sy + self.oy
        x2, y2 = x1 + w * self.sx, y1 + h * self.sy
        x1, y1, x2, y2 = (float(np.clip(v, 0, self.size)) for v in (x1, y1, x2, y2))
        if x2 - x1 < 1 or y2 - y1 < 1:
            return None
        return int(round(x1)), int(round(y1)), max(1, int(round(x2 - x1))), max(1, int(round(y2 - y1)))


def plan_fit(height: int, width: int, p: DataParams) -> Fit:
    """The trim / stretch / crop / pad that turns an (height, width) image into p.image_size²."""
    S = p.image_size
    x0, y0 = p.center_crop * width, p.center_crop * height
    w, h = width - 2 * x0, height - 2 * y0
    if p.fit == "stretch":
        return Fit(x0, y0, S / w, S / h, 0.0, 0.0, S)
    if p.fit == "crop":  # keep the centre square
        side = min(w, h)
        return Fit(x0 + (w - side) / 2, y0 + (h - side) / 2, S / side, S / side, 0.0, 0.0, S)
    scale = S / max(w, h)  # pad: the whole image, letterboxed with black
    return Fit(x0, y0, scale, scale, (S - w * scale) / 2, (S - h * scale) / 2, S)


def fit_square(pixels: np.ndarray, p: DataParams) -> tuple[np.ndarray, Fit]:
    """float [0, 1] (H, W) -> uint8 (S, S) by `plan_fit`; a large film is first shrunk by an integer
    factor with area averaging, so nothing aliases. Pixel edges sit at integer coordinates."""
    H, W = pixels.shape
    fit = plan_fit(H, W, p)
    src = pixels.astype(np.float32)
    k = int(min(1 / fit.sx, 1 / fit.sy))
    if k > 1:
        src = cv2.resize(src, (max(1, W // k), max(1, H // k)), interpolation=cv2.INTER_AREA)
    rw, rh = W / src.shape[1], H / src.shape[0]
    M = np.float32([[fit.sx * rw, 0, (0.5 * rw - fit.x0) * fit.sx + fit.ox - 0.5],
                    [0, fit.sy * rh, (0.5 * rh - fit.y0) * fit.sy + fit.oy - 0.5]])
    out = cv2.warpAffine(src, M, (fit.size, fit.size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                         borderValue=0)
    return np.clip(out * 255 + 0.5, 0, 255).astype(np.uint8), fit


def read_image(path: Path, p: DataParams, salt: str = "") -> tuple[np.ndarray, Fit, Decoded]:
    """Decode and fit one file; raises DecodeError (the caller quarantines it)."""
    decoded = decode(path, max_pixels=p.max_pixels, id_salt=salt)
    if decoded.pixels.ndim != 2 or min(decoded.pixels.shape) < 8:
        raise DecodeError(f"image of shape {decoded.pixels.shape} is too small or not 2-D")
    image, fit = fit_square(decoded.pixels, p)
    return image, fit, decoded


def assign_splits(patients: Iterable[str], p: DataParams, fixed: dict[str, str] | None = None) -> dict[str, str]:
    """patient -> split. Patients in `fixed` (an official split) keep theirs; the others are drawn by
    patient with the val/test fractions of `data.split` renormalised to what is left to draw.
    Real data has no planted shortcut, so there is never a `test_shifted` split."""
    fixed = dict(fixed or {})
    free = sorted(set(map(str, patients)) - set(fixed))
    fractions = {"val": p.split.val, "test": 0.0 if "test" in fixed.values() else p.split.test}
    if "val" in fixed.values():
        fractions["val"] = 0.0
    fixed.update(patient_split(free, fractions, p.seed))
    return fixed


def limited(items: Iterable, p: DataParams) -> Iterator:
    """The first `data.limit` items (all when unset)."""
    for k, item in enumerate(items):
        if p.limit is not None and k >= p.limit:
            return
        yield item


def image_record(root: Path, rel: str, p: DataParams, salt: str, *, shown_as: str | None = None,
                 redact: dict[str, str] | None = None, **fields) -> Pending:
    """The Record for `root/rel` with the given fields (labels, ids, split, boxes in original pixels as
    `boxes_px`), read when the Pending is loaded (a Quarantined row when the file cannot be used).
    `shown_as` replaces `rel` as the source path a user sees; `redact` maps strings (an identifier in
    a file name) to what a quarantine reason says instead."""
    return Pending(load_image_record, (Path(root), rel, p, salt, shown_as, dict(redact or {}), fields))


OUTSIDE_ROOT = "resolves outside data.root (a ../ or absolute path, or a symlink out of it); not read"


def inside_root(root: Path, rel: str) -> Path:
    """`root/rel` with every symlink resolved, when that stays inside `root` (itself resolved); else
    DecodeError, which quarantines the row like an unreadable file.

    Every file a source reads goes through here: a CSV names its files (CheXpert's Path column,
    RSNA's patientId), and a `../`, an absolute path or a symlink in the dataset must not make
    prepare read (and put into the training set) a file from elsewhere on the machine. The resolved
    path is the one to open, so a link swapped after the check is not followed either."""
    try:
        base = Path(root).resolve()
        path = (base / rel).resolve()
    except (OSError, RuntimeError, ValueError) as err:  # a symlink loop, a NUL byte in the name
        raise DecodeError(f"path cannot be resolved ({type(err).__name__}); not read") from None
    if not path.is_relative_to(base):
        raise DecodeError(OUTSIDE_ROOT)
    return path


def load_image_record(root: Path, rel: str, p: DataParams, salt: str, shown_as: str | None,
                      redact: dict[str, str], fields: dict) -> Record | Quarantined:
    fields = dict(fields)
    try:
        image, fit, decoded = read_image(inside_root(root, rel), p, salt)
    except DecodeError as err:
        reason = str(err)
        for secret, public in redact.items():
            reason = reason.replace(secret, public)
        return Quarantined(shown_as or rel, reason)
    boxes = [(label, *b) for label, *box in fields.pop("boxes_px", []) if (b := fit.box(*box)) is not None]
    view = fields.pop("view", None) or decoded.view or "PA"
    return Record(image=image, source_path=shown_as or rel, view=view, boxes=boxes, **fields)


# -- folder datasets with official splits (kermany, cardiomegaly, chexpert) ------------------------

JUNK_NAMES = {".ds_store", "thumbs.db", "desktop.ini"}
SPLIT_RANK = {"train": 0, "val": 1, "test": 2}


def is_junk(name: str) -> bool:
    """OS litter that zips and file browsers leave beside the films (``__MACOSX/``, ``._*``, ...)."""
    return name == "__MACOSX" or name.startswith(".") or name.lower() in JUNK_NAMES


def subfolders(folder: Path | None) -> dict[str, Path]:
    """Sub-folders by upper-cased name (dataset folder names are matched case-insensitively)."""
    if folder is None or not folder.is_dir():
        return {}
    return {c.name.upper(): c for c in sorted(folder.iterdir()) if c.is_dir() and not is_junk(c.name)}


def first_n(items: list, p: DataParams, group: Callable) -> list:
    """All items, or `data.limit` of them taken in turn from each `group(item)` (groups in sorted
    order, each in list order), so that a quick look still has every split and class; the chosen
    items keep their order in `items`."""
    if p.limit is None:
        return list(items)
    groups: dict = {}
    for k, it in enumerate(items):
        groups.setdefault(group(it), []).append(k)
    lists = [groups[key] for key in sorted(groups)]
    order = [g[k] for k in range(max(map(len, lists), default=0)) for g in lists if k < len(g)]
    chosen = set(limited(order, p))
    return [it for k, it in enumerate(items) if k in chosen]


def home_splits(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """patient -> the highest official split (test > val > train) among (patient, official) pairs."""
    home: dict[str, str] = {}
    for patient, official in pairs:
        if patient not in home or SPLIT_RANK[official] > SPLIT_RANK[home[patient]]:
            home[patient] = official
    return home


def official_splits(items: list, p: DataParams, official: Callable[[object], str]) -> Iterator[tuple]:
    """(item, split) for items with `.patient` and `.rel`, honouring official splits by patient.

    A patient keeps its highest official split (`home_splits`); patients whose home is train are
    drawn train/val (and test when no official test exists) by `assign_splits`. An item filed in an
    official split other than its patient's home comes back as (item, Quarantined) instead, so
    that no patient spans two splits."""
    home = home_splits((it.patient, official(it)) for it in items)
    split_of = assign_splits(home, p, fixed={pt: s for pt, s in home.items() if s != "train"})
    for it in items:
        if official(it) != home[it.patient]:
            yield it, Quarantined(it.rel, f"patient also has films in the official {home[it.patient]} split; "
                                          "left out so that no patient spans two splits")
        else:
            yield it, split_of[it.patient]


def official_records(items: list, p: DataParams, official: Callable[[object], str],
                     make: Callable[[object, str], Pending], counts: Counter) -> Iterator:
    """`make(item, split)` for each item of `official_splits`, its Quarantined row otherwise;
    `counts` gets one count per split and per file left out (files that fail to decode are counted
    by prepare, which reads them)."""
    for it, split in official_splits(items, p, official):
        counts["quarantined" if isinstance(split, Quarantined) else split] += 1
        yield split if isinstance(split, Quarantined) else make(it, split)
