"""Typed parameters, loaded once from params.yaml: one pydantic section per stage.

Bad params fail here, before any work starts, with one line naming the param
(`ConfigError: train.arch: unknown architecture 'foo' ...`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)

SOURCES = ("phantom", "kermany", "chexpert", "rsna", "nih", "cardiomegaly")


class ConfigError(ValueError):
    """A parameter is wrong; the message names it."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SplitFractions(_Section):
    val: float = Field(0.15, ge=0, lt=1)
    test: float = Field(0.15, ge=0, lt=1)
    test_shifted: float = Field(0.15, ge=0, lt=1)

    @model_validator(mode="after")
    def _leaves_train(self):
        if self.val + self.test + self.test_shifted >= 0.9:
            raise ValueError("val + test + test_shifted must leave at least 10% for train")
        return self


Uncertainty = Literal["ones", "zeros", "ignore"]


class DataParams(_Section):
    source: Literal["phantom", "kermany", "chexpert", "rsna", "nih", "cardiomegaly"] = "phantom"
    root: str | None = None
    image_size: int = Field(128, ge=32, le=1024)
    shard_size: int = Field(512, ge=1)
    labels: list[str] | None = None  # None = every label the source provides
    split: SplitFractions = SplitFractions()
    seed: int = 0
    # how a real image becomes image_size x image_size: trim `center_crop` of each side first (a fix for
    # heatmaps on the void around the body), then stretch, centre-crop or pad the rest to a square
    fit: Literal["stretch", "crop", "pad"] = "stretch"
    center_crop: float = Field(0.0, ge=0, lt=0.5)
    max_pixels: int = Field(60_000_000, ge=1)   # larger images are refused (decompression bombs)
    limit: int | None = Field(None, ge=1)       # read only the first N images of a source (a quick look)

    @field_validator("labels")
    @classmethod
    def _canonical(cls, v: list[str] | None) -> list[str] | None:
        from pipeline.data.labels import CANONICAL_LABELS

        unknown = [label for label in v or [] if label not in CANONICAL_LABELS]
        if unknown:
            raise ValueError(f"unknown labels {unknown}; canonical labels: {', '.join(CANONICAL_LABELS)}")
        return v

    @model_validator(mode="after")
    def _root_for_real_sources(self):
        if self.source != "phantom":
            if not self.root:
                raise ValueError(f"root is required for source {self.source!r}")
            if not Path(self.root).is_dir():
                raise ValueError(f"root {self.root!r} is not a directory")
        return self


class PhantomParams(_Section):
    n_patients: int = Field(1800, ge=8)
    max_images_per_patient: int = Field(2, ge=1)
    shortcut_p: float = Field(0.95, ge=0, le=1)
    shortcut_labels: list[str] = ["Pneumonia", "Cardiomegaly"]
    prevalence: dict[str, float] = {
        "Pneumonia": 0.4, "Cardiomegaly": 0.4, "Pleural Effusion": 0.2, "Lung Lesion": 0.2,
    }
    opacity_contrast: float = Field(1.0, gt=0)


class ChexpertParams(_Section):
    frontal_only: bool = True
    # what an uncertain (-1) label becomes, per label; defaults follow the CheXpert paper's best policies
    uncertainty: dict[str, Uncertainty] = {"Atelectasis": "ones", "Edema": "ones", "Cardiomegaly": "zeros",
                                           "Consolidation": "zeros", "Pleural Effusion": "zeros"}
    uncertainty_default: Uncertainty = "ignore"
    blank: Literal["zeros", "ignore"] = "zeros"  # a blank cell means "not mentioned"

    @field_validator("uncertainty")
    @classmethod
    def _canonical(cls, v: dict[str, str]) -> dict[str, str]:
        from pipeline.data.labels import CANONICAL_LABELS

        unknown = [label for label in v if label not in CANONICAL_LABELS]
        if unknown:
            raise ValueError(f"unknown labels {unknown}")
        return v


class KermanyParams(_Section):
    # the official val split has 16 images: fold it into train and draw val by patient instead
    resplit_val: bool = True


class NihParams(_Section):
    official_split: bool = True  # use train_val_list.txt / test_list.txt when present


class SegmentParams(_Section):
    encoder: str = "resnet18"
    # the U-Net's side: mask datasets' films and masks are fitted at it (not upsampled from data.image_size)
    size: int = Field(64, ge=32, le=1024)
    n_train: int = Field(400, ge=4)
    epochs: int = Field(8, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(3e-3, gt=0)
    seed: int = 0
    augment: bool = True       # small affine + brightness/contrast (pipeline/segmentation.py), seeded by seed
    # lung/heart mask datasets the U-Net learns from, name -> folder; {} = the data's own masks (the
    # phantom), or for a real dataset without masks, phantom masks (a fallback: domain gap)
    mask_sources: dict[Literal["montgomery", "shenzhen", "jsrt"], str] = {}

    @field_validator("size")
    @classmethod
    def _whole_levels(cls, v: int) -> int:
        if v % 16:
            raise ValueError(f"{v} is not a multiple of 16 (the U-Net halves it four times)")
        return v

    @field_validator("mask_sources")
    @classmethod
    def _roots_exist(cls, v: dict[str, str]) -> dict[str, str]:
        for name, root in v.items():
            if not Path(root).is_dir():
                raise ValueError(f"{name}: {root!r} is not a directory")
        return v


class AugmentParams(_Section):
    rotate_deg: float = Field(5.0, ge=0, le=45)
    shift: float = Field(0.04, ge=0, le=0.3)
    scale: float = Field(0.05, ge=0, le=0.5)
    brightness_contrast: float = Field(0.1, ge=0, le=0.5)
    noise: float = Field(0.0, ge=0, le=0.2)


class TrainParams(_Section):
    arch: str = "tinyvgg"
    weights: str | None = None  # local weights file; never downloaded
    epochs: int = Field(10, ge=1)
    finetune_epochs: int = Field(6, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(3e-3, gt=0)
    finetune_lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    augment: AugmentParams = AugmentParams()
    # decode + augmentation in this many DataLoader worker processes (0 = in the training process);
    # the batches are the same for any count
    num_workers: int = Field(2, ge=0, le=64)
    # a mid-epoch resume point every N optimiser steps (0 = only at the end of each epoch)
    checkpoint_every_steps: int = Field(0, ge=0)
    # DDP: the train stage launches torchrun with this many processes (GPUs, or gloo on the CPU)
    nproc_per_node: int = Field(1, ge=1, le=64)
    seed: int = 0
    # right for the right reasons (Ross et al., 2017) in the fine-tuning cycles: the weight of the squared
    # input gradient inside the clinicians' shortcut boxes (data/feedback); 0 = off
    rrr_weight: float = Field(0.0, ge=0)
    model_kwargs: dict = {}                       # builder options, e.g. {head: bn_mlp, pool: max}
    # partial fine-tuning: only the last N parameter tensors, or only these named modules, train
    trainable_last_n: int | None = Field(None, ge=1)
    trainable_blocks: list[str] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _one_freeze_rule(self):
        if self.trainable_last_n is not None and self.trainable_blocks is not None:
            raise ValueError("set trainable_last_n or trainable_blocks, not both")
        return self

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, v: str) -> str:
        from pipeline.models.registry import list_models

        if v not in list_models():
            raise ValueError(f"unknown architecture {v!r}; registered: {', '.join(list_models())}")
        return v

    @field_validator("model_kwargs")
    @classmethod
    def _options_of_arch(cls, v: dict, info: ValidationInfo) -> dict:
        """Checked against the builder's typed signature (pipeline/models/zoo.py); values kept as written."""
        from pipeline.models.registry import validate_kwargs

        if "arch" in info.data:  # else the arch itself is the error
            validate_kwargs(info.data["arch"], v)
        return v

    @field_validator("trainable_blocks")
    @classmethod
    def _blocks_exist(cls, v: list[str] | None, info: ValidationInfo) -> list[str] | None:
        """Module names are checked on a weightless (meta-device) build: a typo fails in a second."""
        if v is None or "arch" not in info.data or "model_kwargs" not in info.data:
            return v
        import torch

        from pipeline.models.freeze import check_blocks
        from pipeline.models.registry import model_spec, validate_kwargs

        arch = info.data["arch"]
        with torch.device("meta"):
            model = model_spec(arch).builder(num_classes=1, image_size=None,
                                             **validate_kwargs(arch, info.data["model_kwargs"]))
        check_blocks(model, v)
        return v

    @field_validator("weights")
    @classmethod
    def _weights_exist(cls, v: str | None) -> str | None:
        if v is not None and not Path(v).is_file():
            raise ValueError(f"weights file {v!r} does not exist")
        return v


class CamParams(_Section):
    # gradient methods and eigencam/scorecam all come from one backbone pass (pipeline/cam/all_labels.py)
    method: str = "gradcam"
    size: int | None = Field(None, ge=4, le=64)  # stored side; None = the target layer's own grid
    batch_size: int = Field(64, ge=1)

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        from pipeline.cam.all_labels import METHODS

        if v not in METHODS:
            raise ValueError(f"unknown CAM method {v!r}; available: {', '.join(METHODS)}")
        return v


class EnhanceParams(_Section):
    policy: Literal["counterfactual", "overlay", "suppress"] = "counterfactual"
    # counterfactual: which off-anatomy region is decorrelated (swapped with a donor image's)
    region: Literal["outside", "cam"] = "outside"
    cam_threshold: float = Field(0.2, ge=0, le=1)  # atlas level that marks an attended region
    keep_share: float = Field(0.7, ge=0, le=1)     # a CAM this inside its anatomy is "accurate"
    keep_band: int = Field(6, ge=0)                # px beyond the margin where accurate CAMs may keep
    anatomy_margin: int = Field(3, ge=0)           # px dilation of the kept anatomy
    feather: float = Field(1.5, ge=0)              # px blur of the swap boundary
    overlay_floor: float = Field(0.2, ge=0, le=1)  # overlay policy: outside kept at this fraction
    seed: int = 0


class EvaluateParams(_Section):
    n_cam_images: int = Field(400, ge=1)      # test images scored for localisation
    n_sanity_images: int = Field(16, ge=1)
    n_faithfulness_images: int = Field(4, ge=1)   # ROAD costs ~0.9 s per image at 128 px
    pointing_tolerance_px: int = Field(2, ge=0)


class SanityParams(_Section):
    """The saliency sanity stage (pipeline/sanity_checks.py) after the last evaluated cycle."""
    label_permutation: bool = True                # train the permuted-label twin (Adebayo's data randomisation)
    epochs: int | None = Field(None, ge=1)        # the twin's epochs; None = train.epochs (cycle 0's)
    n_images: int | None = Field(None, ge=1)      # test images compared; None = evaluate.n_sanity_images
    seed: int = 0                                 # which permutation of the training labels


class AuditParams(_Section):
    """The shortcut audit (pipeline/audit.py): a controlled marker planted in any dataset's films, so
    the shortcut gap the cycle exists to close can be measured on real data too. Off by default."""
    enabled: bool = False
    label: str = "Pneumonia"                      # the marker agrees with this label
    p: float = Field(0.95, ge=0.5, le=1.0)        # agreement in train/val/test; 1 - p in test_shifted
    size: float = Field(0.09, gt=0.02, le=0.2)    # glyph height as a share of the image side
    seed: int = 0


class ReportParams(_Section):
    grid_images: int = Field(8, ge=1, le=100)


class FlowParams(_Section):
    min_gain: float = Field(0.01, ge=0)          # pointing-game gain that counts as improvement
    patience: int = Field(2, ge=1)               # stop after this many cycles without gain
    auroc_tolerance: float = Field(0.05, ge=0)   # stop when clean AUROC drops more than this
    retries: int = Field(1, ge=0)


class EngineParams(_Section):
    """Where the shard-parallel stages (prepare, segmentation predict, CAM, enhance) run. Not a DVC
    param of any stage: outputs are the same bit for bit on every engine, so changing it re-runs nothing."""
    kind: Literal["dask", "local"] = "dask"      # dask: tasks on a Dask cluster; local: in this process
    address: str | None = None                   # a running scheduler (tcp://host:8786); None = a LocalCluster
    workers: int | None = Field(None, ge=1)      # LocalCluster worker processes; None = the CPU count
    threads_per_worker: int = Field(1, ge=1)     # torch threads in each worker
    in_flight: int | None = Field(None, ge=1)    # shard results held at once; None = 2 per worker


class ComputeParams(_Section):
    """Hardware and arithmetic for every torch stage and the viewer (pipeline/compute.py)."""
    device: str = "auto"                          # auto | cpu | cuda | cuda:N | mps (auto: CUDA when present)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # autocast; fp16 with a GradScaler (GPU only)
    threads: int = Field(0, ge=0)                 # torch CPU threads per stage; 0 = every core, never inherited

    @field_validator("device")
    @classmethod
    def _known_device(cls, v: str) -> str:
        from pipeline.compute import check_device

        return check_device(v)

    @model_validator(mode="after")
    def _precision_on_device(self):
        from pipeline.compute import check_precision, resolve_device

        check_precision(self.precision, resolve_device(self.device))
        return self


class CycleItem(_Section):
    id: int = Field(ge=1)
    prev: int = Field(ge=0)


class Params(_Section):
    data: DataParams = DataParams()
    phantom: PhantomParams = PhantomParams()
    chexpert: ChexpertParams = ChexpertParams()
    kermany: KermanyParams = KermanyParams()
    nih: NihParams = NihParams()
    segment: SegmentParams = SegmentParams()
    train: TrainParams = TrainParams()
    cam: CamParams = CamParams()
    enhance: EnhanceParams = EnhanceParams()
    evaluate: EvaluateParams = EvaluateParams()
    sanity: SanityParams = SanityParams()
    audit: AuditParams = AuditParams()
    report: ReportParams = ReportParams()
    flow: FlowParams = FlowParams()
    engine: EngineParams = EngineParams()
    compute: ComputeParams = ComputeParams()
    cycles: dict[str, CycleItem] = {"c1": CycleItem(id=1, prev=0)}

    @field_validator("cycles")
    @classmethod
    def _cycle_chain(cls, cycles: dict[str, CycleItem]) -> dict[str, CycleItem]:
        seen = {0}
        for key, item in sorted(cycles.items(), key=lambda kv: kv[1].id):
            if key != f"c{item.id}":
                raise ValueError(f"key {key!r} must be 'c{item.id}' (c<id>)")
            if item.prev not in seen:
                raise ValueError(f"{key}.prev={item.prev} breaks the chain: cycle {item.prev} is not defined")
            if item.prev != item.id - 1:
                raise ValueError(f"{key}.prev={item.prev} breaks the chain: expected {item.id - 1}")
            seen.add(item.id)
        return cycles

    def cycle_ids(self) -> list[int]:
        """0 (baseline) followed by every configured refinement cycle, in order."""
        return [0] + sorted(item.id for item in self.cycles.values())


def _format_error(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "params"
    msg = first["msg"].removeprefix("Value error, ")
    return f"{where}: {msg}"


def load_params(path: str | os.PathLike = "params.yaml") -> Params:
    """Load and validate params.yaml; raise ConfigError with a one-line message naming the param."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"params file {str(p)!r} not found")
    raw = yaml.safe_load(p.read_text()) or {}
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None
