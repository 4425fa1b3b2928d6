"""The viewer's inference: the served model, cycle 0 and the anatomy U-Net, loaded once per process.

`ServedModels.analyse(file bytes)` decodes with the project's safe decoder, prepares the image exactly as
training saw it (`fit_square` at the checkpoint's image size, the checkpoint's normalisation), and
returns every label's probability and heatmap from one pass per model (`AllLabelCAM`), the
predicted anatomy, the share of each heatmap's energy inside its label's anatomy (the same
`energy_share` the evaluation reports) and that share's lift over the anatomy's share of the image,
which the shortcut warning judges (shortcut_warning.py). `analyse_image` does the same for a film
already prepared (the review mode's, from the run's own store). Nothing is written to disk. Models are shared by all
requests; a lock runs one analysis at a time (the CAM hooks belong to the shared modules, and two
concurrent passes on a 2-core CPU are not faster than one after the other).

Models live on the device of params.yaml's `compute.device` (`auto`: CUDA when present, else the
CPU, so the same params serve on a laptop). Each model's probabilities come from the same fp32 pass
as its heatmaps (CAMs are fp32 whatever the precision: pipeline/cam/all_labels.py); `compute.precision`
applies to the U-Net's anatomy.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline.cam.all_labels import AllLabelCAM
from pipeline.cam.maps import resize
from pipeline.compute import CPU, Compute
from pipeline.config import ComputeParams, ConfigError, DataParams, Params, Paths, load_params
from pipeline.data.decode import DecodeError, decode
from pipeline.data.labels import LABEL_ANATOMY
from pipeline.data.record import decode_anatomy
from pipeline.data.sources.common import fit_square
from pipeline.data.transforms import NORMALISATION, to_model_input
from pipeline.io import read_json
from pipeline.metrics.localization import energy_share
from pipeline.models.checkpoint import MODEL_FILE, CheckpointError, file_sha256, load_model
from pipeline.viewer.limits import VIEWER_MAX_PIXELS
from pipeline.viewer.shortcut_warning import anatomy_fraction, lift

log = logging.getLogger(__name__)

HOW_TO_TRAIN = ("No model trained yet: run `make run` (the whole cycle on the built-in phantom, about "
                "15 minutes on 2 cores) or `dvc repro`, then reload this page.")
MIN_SIDE = 8


class NoModel(RuntimeError):
    """No checkpoint to serve yet; the message says how to train one."""


class ImageError(ValueError):
    """The upload cannot be analysed; the message is one line, safe to show (no identifiers)."""


@dataclass
class Served:
    model: torch.nn.Module
    meta: dict
    cam: AllLabelCAM
    path: Path
    sha256: str
    logits: list = field(default_factory=list)  # filled by a forward hook during a pass

    @property
    def cycle(self) -> int:
        return int(self.meta.get("cycle", 0))


@dataclass
class ModelResult:
    cycle: int
    probabilities: np.ndarray        # (L,)
    cams: np.ndarray                 # (L, S, S) float32 in [0, 1]
    shares: list[float | None]       # energy inside each label's anatomy (None without a U-Net)
    lifts: list[float | None] = field(default_factory=list)  # share / the anatomy's share of the image
    grid: int | None = None          # the heatmaps' native side (the CAM layer's grid) before upsampling


@dataclass
class Analysis:
    image: np.ndarray                # uint8 (S, S): what the model saw
    labels: list[str]
    thresholds: list[float]
    latest: ModelResult
    baseline: ModelResult | None
    mask: np.ndarray | None          # uint8 bit mask (S, S): 1 lungs, 2 heart
    source: dict                     # format, view, original width/height (no identifiers)
    timings_ms: dict
    fractions: list[float | None] = field(default_factory=list)  # each label's anatomy's share of the image

    def order(self) -> list[int]:
        """Label indices by the served model's probability, highest first."""
        return [int(i) for i in np.argsort(-self.latest.probabilities, kind="stable")]


def anatomy_of_label(label: str) -> str:
    return LABEL_ANATOMY.get(label, "both")


class ServedModels:
    """Loads lazily (so the viewer starts, and says how to train, before any model exists)."""

    def __init__(self, root: str | os.PathLike = ".", *, max_pixels: int | None = None,
                 cam_method: str | None = None, baseline: bool = True):
        self.root = Path(root).resolve()
        self.paths = Paths(self.root)
        self.params = self._params()
        self.compute = self._compute()
        self.max_pixels = int(max_pixels or os.environ.get("CXR_MAX_PIXELS") or VIEWER_MAX_PIXELS)
        self.cam_method = cam_method or self.params.cam.method
        self.want_baseline = baseline
        self._lock = threading.RLock()   # analyses one at a time; a model swap waits for them
        self._load_lock = threading.Lock()
        self.latest: Served | None = None
        self.baseline: Served | None = None
        self.unet: torch.nn.Module | None = None
        self.unet_meta: dict = {}
        self.latest_info: dict = {}
        self.error: str | None = None
        self._loaded_stamp: tuple[int, int] | None = None
        self._failed_stamp: tuple[int, int] | None = None   # latest.json as it was when loading it failed

    def _params(self) -> Params:
        path = self.paths.params
        try:
            return load_params(path) if path.is_file() else Params()
        except ConfigError as err:
            # e.g. a real dataset's root that is not on this machine: the viewer needs only how images
            # were fitted to a square, which it takes from the raw file
            import yaml

            log.warning("params.yaml does not validate here (%s); reading data.fit/center_crop from it as is", err)
            doc = yaml.safe_load(path.read_text()) or {}
            raw = doc.get("data", {}) or {}
            keep = {k: raw[k] for k in ("fit", "center_crop", "max_pixels") if k in raw}
            return Params.model_construct(data=DataParams.model_construct(**{**DataParams().model_dump(), **keep}),
                                          cam=Params().cam, compute=self._fallback_compute(doc.get("compute")))

    @staticmethod
    def _fallback_compute(raw) -> ComputeParams:
        """The `compute` section of a params.yaml that does not validate here: its precision on whatever
        device `auto` finds (a `device: cuda` written on a GPU machine must not stop the viewer on a
        laptop), else the defaults (auto, fp32)."""
        precision = raw.get("precision", "fp32") if isinstance(raw, dict) else "fp32"
        try:
            return ComputeParams(device="auto", precision=precision)
        except ValueError:  # pydantic's ValidationError is one
            return ComputeParams()

    def _compute(self) -> Compute:
        """Where the viewer's models run; the CPU (with a warning) if the params' device cannot be used."""
        try:
            compute = Compute.from_params(self.params.compute)
        except ValueError as err:
            log.warning("compute settings cannot be used here (%s); running on the CPU in fp32", err)
            return CPU
        log.info("viewer models on %s in %s", compute.device, compute.precision)
        return compute

    # -- loading ---------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.latest is not None

    def _stamp(self) -> tuple[int, int] | None:
        """models/latest.json's (mtime, size): a new cycle or a `dvc checkout` changes it."""
        try:
            st = self.paths.latest.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def load(self) -> None:
        """Load the served checkpoint, cycle 0 and the U-Net; again when models/latest.json changes
        (a newly trained cycle is served without a restart). Raise NoModel when there is none."""
        stamp = self._stamp()
        if self.latest is not None and (stamp is None or stamp == self._loaded_stamp):
            return  # latest.json gone (e.g. mid-checkout): keep serving what is loaded
        with self._load_lock:
            if self.latest is not None and (stamp is None or stamp == self._loaded_stamp):
                return
            if stamp is None:
                raise NoModel(HOW_TO_TRAIN)
            if self.latest is None and stamp == self._failed_stamp:
                raise NoModel(f"{self.error}. {HOW_TO_TRAIN}")   # the same broken file: do not load it again
            try:
                info = read_json(self.paths.latest)
                latest = self._serve(self.root / info["checkpoint"])
                baseline = None
                if self.want_baseline and info.get("baseline"):
                    base_path = self.root / info["baseline"]
                    baseline = latest if base_path.resolve() == latest.path.resolve() else self._serve(base_path)
                unet, unet_meta = self.unet, self.unet_meta
                unet_path = self.paths.unet_weights
                if unet_path.is_file():
                    from pipeline.segmentation import load_unet

                    unet, unet_meta = load_unet(unet_path, self.compute.device)
                    for p in unet.parameters():
                        p.requires_grad_(False)
            except (CheckpointError, KeyError, OSError, ValueError) as err:
                if self.latest is not None:  # keep serving the loaded model; say why in the log
                    log.warning("models/latest.json changed but the new model could not be loaded (%s); "
                                "still serving cycle %d", err, self.latest.cycle)
                    self._loaded_stamp = stamp
                    return
                # the detail (it names files) goes to the log; what callers see names no path
                log.warning("the served model could not be loaded: %s", err)
                self.error, self._failed_stamp = "the served model could not be loaded (see the viewer's log)", stamp
                raise NoModel(f"{self.error}. {HOW_TO_TRAIN}") from None
            with self._lock:  # never swap models under a running analysis
                self.latest_info, self.baseline, self.unet, self.unet_meta = info, baseline, unet, unet_meta
                self.latest, self._loaded_stamp, self._failed_stamp, self.error = latest, stamp, None, None
            log.info("serving cycle %d (%s) with cycle %s beside it", latest.cycle, latest.meta["arch"],
                     baseline.cycle if baseline else "-")

    def _serve(self, path: Path) -> Served:
        model, meta = load_model(path, self.compute.device)
        for p in model.parameters():   # inference only: the CAM needs gradients of activations, not weights
            p.requires_grad_(False)
        weights = path if path.is_file() else path / MODEL_FILE
        served = Served(model, meta, AllLabelCAM(model, meta["arch"], self.cam_method), weights, file_sha256(weights))
        model.register_forward_hook(lambda m, i, out: served.logits.append(out.detach()))
        return served

    # -- analysis --------------------------------------------------------------------------------
    def prepare(self, data: bytes, served: Served | None = None) -> tuple[np.ndarray, dict]:
        """File bytes -> (uint8 S x S as `served` (default: the latest model) saw it in training,
        non-identifying facts about the file)."""
        if served is None:
            self.load()
            served = self.latest
        try:
            decoded = decode(data, max_pixels=self.max_pixels, id_salt="")
        except DecodeError as err:
            raise ImageError(str(err)) from None
        except Exception as err:  # a decoder bug must not become a traceback for the user
            log.warning("decoder failed unexpectedly: %s", type(err).__name__)
            raise ImageError(f"not a readable PNG/JPEG/DICOM image ({type(err).__name__})") from None
        px = decoded.pixels
        if px.ndim != 2:
            raise ImageError(f"expected one 2-D grayscale image, got an array of shape {tuple(px.shape)} "
                             "(multi-frame or colour data)")
        if min(px.shape) < MIN_SIDE:
            raise ImageError(f"image of {px.shape[1]}x{px.shape[0]} pixels is too small")
        if not np.isfinite(px).all():
            raise ImageError("the image holds non-finite pixel values")
        image, _ = fit_square(px, self.params.data.model_copy(update={"image_size": int(served.meta["image_size"])}))
        return image, {"format": decoded.format, "view": decoded.view,
                       "width": int(px.shape[1]), "height": int(px.shape[0])}

    def analyse(self, data: bytes, baseline: bool = True) -> Analysis:
        return self._analyse(lambda served: self.prepare(data, served), baseline)

    def analyse_image(self, image: np.ndarray, source: dict, baseline: bool = True) -> Analysis:
        """The analysis of a film already prepared (uint8 square, as the run's store holds it), resized
        to the served model's image size if the store's differs."""
        def prepared(served: Served) -> tuple[np.ndarray, dict]:
            size = int(served.meta["image_size"])
            img = np.asarray(image, np.uint8)
            if img.shape != (size, size):
                import cv2

                img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
            return img, source
        return self._analyse(prepared, baseline)

    def _analyse(self, prepare, baseline: bool) -> Analysis:
        t0 = time.perf_counter()
        self.load()   # a newly trained model is picked up here, before the analysis starts
        with self._lock:
            # everything read from the served model is read under the lock: a hot reload swaps models
            # (and their labels and thresholds) only between analyses
            served = self.latest
            labels, thresholds = list(served.meta["labels"]), [float(t) for t in served.meta["thresholds"]]
            t1 = time.perf_counter()
            image, source = prepare(served)   # at the image size of the model that runs
            t2 = time.perf_counter()
            latest = self._run(served, image)
            t3 = time.perf_counter()
            base = None
            if baseline and self.baseline is not None:
                base = latest if self.baseline is served else self._run(self.baseline, image)
            t4 = time.perf_counter()
            mask = self._mask(image)
            t5 = time.perf_counter()
        regions = self._regions(mask, labels)
        fractions = [None if r is None else anatomy_fraction(r) for r in regions]
        for result in (latest, base):
            if result is not None:
                shares = self._shares(result.cams, regions)
                result.shares = [None if s is None else round(s, 4) for s in shares]
                result.lifts = [None if s is None or f is None else round(lift(s, f), 4)
                                for s, f in zip(shares, fractions)]
        t6 = time.perf_counter()
        ms = lambda a, b: round((b - a) * 1000, 2)  # noqa: E731
        timings = {"wait": ms(t0, t1), "decode": ms(t1, t2), "latest": ms(t2, t3), "baseline": ms(t3, t4),
                   "unet": ms(t4, t5), "shares": ms(t5, t6), "total": ms(t0, t6)}
        return Analysis(image, labels, thresholds, latest, base, mask, source, timings,
                        [None if f is None else round(f, 4) for f in fractions])

    def _run(self, served: Served, image: np.ndarray) -> ModelResult:
        x = to_model_input(image[None], served.meta.get("normalisation", NORMALISATION))
        served.logits.clear()
        low = served.cam(x)                                   # (1, L, h, w): every label, one fp32 pass
        logits = served.logits[0]
        served.logits.clear()
        cams = resize(low, image.shape[-1])[0].cpu().numpy().astype(np.float32)
        probs = torch.sigmoid(logits.float())[0].cpu().numpy()
        return ModelResult(served.cycle, probs, cams, [None] * len(probs), grid=int(low.shape[-1]))

    @torch.no_grad()
    def _mask(self, image: np.ndarray) -> np.ndarray | None:
        if self.unet is None:
            return None
        from pipeline.anatomy_checks import postprocess
        from pipeline.segmentation import predict_masks

        # cleaned as the pipeline cleans every mask (two largest lungs, largest heart): the same shares
        mask = predict_masks(self.unet, image[None], int(self.unet_meta.get("size", 64)), image.shape[-1],
                             self.compute)[0]
        return postprocess(mask)[0]

    @staticmethod
    def _regions(mask: np.ndarray | None, labels: list[str]) -> list[np.ndarray | None]:
        """Each label's anatomy as a bool mask (None without a U-Net)."""
        return [None if mask is None else decode_anatomy(mask, anatomy_of_label(label)) for label in labels]

    @staticmethod
    def _shares(cams: np.ndarray, regions: list[np.ndarray | None]) -> list[float | None]:
        out = []
        for cam, region in zip(cams, regions):
            share = None if region is None else energy_share(cam, region)
            out.append(None if share is None else float(share))
        return out

    def forward_only(self, image: np.ndarray, baseline: bool = True) -> None:
        """The plain forward passes an analysis needs (classifiers + U-Net, no CAM): the benchmark's yardstick."""
        with self._lock, torch.no_grad():
            for served in ([self.latest, self.baseline] if baseline and self.baseline is not None
                           and self.baseline is not self.latest else [self.latest]):
                x = to_model_input(image[None], served.meta.get("normalisation", NORMALISATION))
                served.model(x.to(self.compute.device))
                served.logits.clear()
            self._mask(image)
