"""`make bench-gpu`: the figures that say whether a CheXpert-scale refinement cycle is practical on one GPU,
written to reports/benchmarks.json under `gpu`.

Measured on the device: DenseNet121 training images/s at 224 px in fp32 and under autocast (bf16, or fp16
with a GradScaler); whether the real training loader (pipeline/data/loader.py) keeps the device busy, with
0 and N worker processes; all-label CAM and inference images/s; the viewer's latency (in process, and over
its HTTP API). On the CPU, as in the pipeline: the enhancement's cost per image. From these rates, one
cycle on CheXpert is projected, with the assumptions written beside the figures.

Without CUDA, `python -m benchmarks.gpu` stops with one line and writes nothing: CPU figures must never
pass for GPU ones. `--device cpu --quick` runs the same code with tiny sizes (seconds; the tests use it) and
writes under `gpu_dryrun_cpu` (`--quick` on a GPU: `gpu_quick`), so the real figures are never overwritten.
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from benchmarks.input_pipeline import loader_rate, phantom_store, phantom_targets, train_rates, train_step
from benchmarks.timing import median_ms
from pipeline.compute import Compute, available_cores, check_device, check_precision, grad_scaler, set_threads
from pipeline.config import Paths
from pipeline.io import read_json, write_json

log = logging.getLogger("benchmarks.gpu")
OUT = Paths().benchmarks
NO_CUDA = "no CUDA device: make bench-gpu needs a GPU"

CHEXPERT_FILMS = 224_316          # CheXpert v1.0, every film (frontal and lateral)
CHEXPERT_FRONTAL_TRAIN = 191_000  # about: the frontal films of train.csv (chexpert.frontal_only, the default)
CHEXPERT_FRONTAL_TEST = 202       # about: the frontal films of valid.csv, the pipeline's CheXpert test split
BUSY_WAIT_SHARE = 0.10            # a loader keeps the device busy when steps wait for it at most this share


@dataclass(frozen=True)
class Sizes:
    """How much each measurement runs: the real sizes, or tiny ones that only prove the code path."""
    arch: str
    image_size: int
    labels: int
    batch: int
    warmup: int            # steps before timing (cuDNN autotuning, allocator warm-up)
    steps: int             # timed training steps on device-resident batches
    store_images: int      # films in the phantom store the loader and the CAM read
    distinct: int          # of which rendered (the rest repeat them)
    loader_epochs: int     # timed epochs through the loader (after a warm-up epoch for the loader alone)
    loader_warmup: int     # training steps left out of the loader-fed rates (worker start-up)
    cam_batch: int
    viewer_repeats: int
    film_size: int         # side of the PNG uploaded to the viewer
    http: bool             # also time the viewer's API (starts a server: ~20 s)
    enhance_images: int


FULL = Sizes("densenet121", 224, 14, 64, 5, 20, 2048, 256, 2, 5, 64, 10, 1024, True, 64)
QUICK = Sizes("tinyvgg", 64, 4, 8, 1, 2, 32, 16, 1, 1, 8, 2, 256, False, 8)


def resolve(spec: str) -> torch.device:
    """The device `spec` names, or SystemExit with one line: without CUDA the GPU bench cannot run."""
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(NO_CUDA)
    try:
        check_device(spec)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    if spec == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(spec)


def amp_precision(device: torch.device, choice: str) -> str:
    """The reduced precision to compare with fp32: bf16 where the device has it, else fp16."""
    if choice == "auto":
        choice = "bf16" if device.type != "cuda" or torch.cuda.is_bf16_supported() else "fp16"
    try:
        return check_precision(choice, device)
    except ValueError as err:
        raise SystemExit(str(err)) from None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _model(arch: str, labels: int, size: int, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    from pipeline.models.registry import create_model

    return create_model(arch, labels, image_size=size).to(device)


def machine(device: torch.device) -> dict:
    out = {"device": str(device), "cores": available_cores(), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "platform": platform.platform()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version(), cudnn_benchmark=torch.backends.cudnn.benchmark,
                   tf32_conv=torch.backends.cudnn.allow_tf32, tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
    return out


def bench_train(s: Sizes, device: torch.device, amp: str) -> dict:
    """Training images/s with the batch already on the device: what the model alone allows, fp32 vs `amp`."""
    out: dict = {"arch": s.arch, "image_size": s.image_size, "labels": s.labels, "batch_size": s.batch}
    for precision in ("fp32", amp):
        compute = Compute(device, precision)
        model = _model(s.arch, s.labels, s.image_size, device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        scaler = grad_scaler(device, precision)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(s.batch, 3, s.image_size, s.image_size, generator=gen).to(device)
        x = x.contiguous(memory_format=torch.channels_last)  # as pipeline.data.transforms.to_model_input makes it
        y = (torch.rand(s.batch, s.labels, generator=gen) < 0.3).float().to(device)
        for _ in range(s.warmup):
            train_step(model, opt, scaler, compute, x, y)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        _sync(device)
        t = time.perf_counter()
        for _ in range(s.steps):
            train_step(model, opt, scaler, compute, x, y)
        _sync(device)
        ms = (time.perf_counter() - t) / s.steps * 1000
        out[precision] = {"images_per_s": round(s.batch / ms * 1000, 1), "step_ms": round(ms, 2)}
        if device.type == "cuda":
            out[precision]["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        log.info("train %s %s: %s", s.arch, precision, out[precision])
        del model, opt
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out["amp"] = amp
    out["amp_over_fp32"] = round(out[amp]["images_per_s"] / out["fp32"]["images_per_s"], 3)
    return out


def bench_loader(s: Sizes, store, targets: np.ndarray, compute: Compute, workers: tuple[int, ...]) -> dict:
    """Does the real loader keep the device busy? The loader alone, then training fed by it (under
    `compute`'s precision, the faster one, so the hardest to feed) with each worker count."""
    pin = compute.device.type == "cuda"
    alone = {f"{w}_workers": loader_rate(store, targets, s.batch, w, s.loader_epochs, pin_memory=pin) for w in workers}
    log.info("loader alone: %s", alone)
    fed = train_rates(lambda: _model(s.arch, s.labels, s.image_size, compute.device), store, targets, s.batch,
                      workers, compute, s.loader_epochs + 1, s.loader_warmup)
    for v in fed.values():
        v["keeps_device_busy"] = v["wait_share"] <= BUSY_WAIT_SHARE
    log.info("training fed by the loader (%s): %s", compute.precision, fed)
    return {"images": len(store), "batch_size": s.batch, "precision": compute.precision, "loader_alone": alone,
            "training": fed, "busy_means": f"wait_share <= {BUSY_WAIT_SHARE}: steps wait for the next batch at most "
                                          f"{BUSY_WAIT_SHARE:.0%} of the time"}


def bench_cam(s: Sizes, store, compute: Compute) -> dict:
    """All-label CAM images/s as the CAM stage makes them (pipeline/cam/store.py: batches read in the
    process, CAMs in fp32 whatever the precision), and plain inference images/s in fp32 and `compute`'s."""
    from pipeline.cam.all_labels import dataset_cams
    from pipeline.data.dataset import iterate_batches, predict

    n, idx, device = len(store), np.arange(len(store)), compute.device
    model = _model(s.arch, s.labels, s.image_size, device).eval()
    out: dict = {"arch": s.arch, "image_size": s.image_size, "labels": s.labels, "batch_size": s.cam_batch,
                 "images": n}
    for precision in dict.fromkeys(("fp32", compute.precision)):
        ms = median_ms(lambda: predict(model, store, idx, s.cam_batch, Compute(device, precision)), 2)
        out[f"inference_{precision}_images_per_s"] = round(n / ms * 1000, 1)
    ms = median_ms(lambda: list(dataset_cams(model, s.arch, (x for x, _, _ in iterate_batches(store, idx, None,
                                                                                          s.cam_batch)))), 2)
    out["cam_images_per_s"] = round(n / ms * 1000, 1)
    log.info("cam: %s", out)
    return out


def bench_viewer(s: Sizes, device: torch.device) -> dict:
    """The viewer's latency with its models on `device`: benchmarks/viewer.py's measurements on a
    throwaway project whose params put `compute` there (the served architecture at `s`'s size)."""
    from pipeline.config import Params, load_params
    from pipeline.data import phantom
    from pipeline.data.labels import CANONICAL_LABELS
    from benchmarks.viewer import _film, _http, _in_process, _project

    params = load_params(Paths().params) if Paths().params.is_file() else Params()
    labels = list(CANONICAL_LABELS)[: s.labels] if s.labels > len(phantom.PHANTOM_LABELS) \
        else list(phantom.PHANTOM_LABELS)[: s.labels]
    data = _film(s.film_size)
    with tempfile.TemporaryDirectory(prefix="cxr-bench-gpu-viewer-") as tmp:
        root = Path(tmp)
        _project(root, params, s.arch, s.image_size, labels)
        doc = yaml.safe_load(Paths(root).params.read_text()) or {}
        doc["compute"] = {**(doc.get("compute") or {}), "device": str(device), "precision": "fp32"}
        Paths(root).params.write_text(yaml.safe_dump(doc, sort_keys=False))
        out = {"arch": s.arch, "image_size": s.image_size, "labels": len(labels), "device": str(device),
               "upload": f"{s.film_size}x{s.film_size} PNG", **_in_process(root, data, s.viewer_repeats)}
        if s.http:
            try:
                out.update(_http(root, data, s.viewer_repeats, 4, 3))
            except Exception as err:  # the in-process figures stand on their own; say why the API's are missing
                log.warning("viewer API not timed: %s", err)
                out["http_error"] = f"{type(err).__name__}: {err}"
    log.info("viewer: %s", out)
    return out


def bench_enhance(s: Sizes) -> dict:
    """The enhancement's CPU cost per image at `s`'s size: the atlas pass over the training CAMs (one
    process) and the counterfactual swap (one task per shard, so it spreads over the cores)."""
    from pipeline.config import EnhanceParams
    from pipeline.data import phantom
    from pipeline.data.labels import CANONICAL_LABELS
    from pipeline.data.record import encode_anatomy
    from pipeline.data.store import ArrayStoreWriter
    from pipeline.enhance import counterfactual, off_anatomy_atlas

    n, size = s.enhance_images, s.image_size
    labels = list(CANONICAL_LABELS)[: s.labels] if s.labels > len(phantom.PHANTOM_LABELS) \
        else list(phantom.PHANTOM_LABELS)[: s.labels]
    rng = np.random.default_rng(0)
    films = [phantom.render(rng, size, phantom.sample_patient(rng), {lab: False for lab in phantom.PHANTOM_LABELS}, {})
             for _ in range(n)]
    images = np.stack([f.image for f in films])
    anatomy = np.stack([encode_anatomy(f.lungs, f.heart) for f in films])
    grid = max(1, size // 32)  # DenseNet121's and ResNet's CAM grid (7 at 224 px)
    cams = rng.random((n, len(labels), grid, grid)).astype(np.float16)
    hot = np.zeros((size, size), bool)
    hot[: size // 4, : size // 4] = True  # an attended corner, where a marker would sit
    p = EnhanceParams()
    with tempfile.TemporaryDirectory(prefix="cxr-bench-enhance-") as tmp:
        cam_writer = ArrayStoreWriter(Path(tmp) / "cams", cams.shape[1:], np.float16, n)
        cam_writer.append(cams)
        mask_writer = ArrayStoreWriter(Path(tmp) / "masks", (size, size), np.uint8, n)
        mask_writer.append(anatomy)
        cam_store, mask_store = cam_writer.close(), mask_writer.close()
        atlas = median_ms(lambda: off_anatomy_atlas(cam_store, mask_store, labels, p.keep_share), 2)
    swap = median_ms(lambda: counterfactual(images, np.roll(images, 1, axis=0), anatomy, hot, p), 2)
    out = {"image_size": size, "labels": len(labels), "images": n, "atlas_ms_per_image": round(atlas / n, 3),
           "counterfactual_ms_per_image": round(swap / n, 3)}
    log.info("enhance: %s", out)
    return out


def projection(s: Sizes, train: float, infer: float, cam: float, enhance: dict, cores: int, precision: str) -> dict:
    """Hours of one CheXpert cycle from the measured rates (images/s), with the assumptions beside them."""
    from pipeline.config import Params, load_params

    try:
        params = load_params(Paths().params) if Paths().params.is_file() else Params()
    except Exception:  # e.g. a real dataset's root that is not on this machine: the defaults then
        params = Params()
    val_n = round(CHEXPERT_FRONTAL_TRAIN * params.data.split.val)
    train_n, test_n = CHEXPERT_FRONTAL_TRAIN - val_n, CHEXPERT_FRONTAL_TEST

    def cycle(epochs: int, enhanced: bool) -> dict:
        h = {"train": (epochs * train_n / train + (epochs + 1) * val_n / infer) / 3600,
             "cam": (train_n + val_n) / cam / 3600,
             "enhance": ((train_n * enhance["atlas_ms_per_image"]
                          + (train_n + val_n) * enhance["counterfactual_ms_per_image"] / cores) / 1000 / 3600
                         if enhanced else 0.0),
             "evaluate": test_n * (1 / infer + 1 / cam) / 3600}
        # three significant figures: evaluating 202 films takes seconds, which hours rounded to 0.001 would hide
        return {"epochs": epochs, **{f"{k}_h": float(f"{v:.3g}") for k, v in h.items()},
                "total_h": float(f"{sum(h.values()):.3g}")}

    return {
        "images": {"chexpert_films": CHEXPERT_FILMS, "frontal_train_csv": CHEXPERT_FRONTAL_TRAIN, "train": train_n,
                   "val": val_n, "test": test_n},
        "rates_images_per_s": {"train": train, "inference": infer, "cam": cam},
        "refinement_cycle": cycle(params.train.finetune_epochs, True),
        "first_cycle": cycle(params.train.epochs, False),
        "assumptions": [
            f"frontal films only (chexpert.frontal_only): about {CHEXPERT_FRONTAL_TRAIN:,} in train.csv, split by "
            f"patient into train and val (data.split.val = {params.data.split.val}); valid.csv's {test_n} frontal "
            "films are the test split",
            f"train: train.finetune_epochs = {params.train.finetune_epochs} epochs per refinement cycle "
            f"(train.epochs = {params.train.epochs} for the first) at the loader-fed training rate "
            f"({s.arch}, {s.image_size} px, {precision} autocast, the most loader workers measured), plus a val "
            f"inference pass per epoch and one to calibrate thresholds ({precision} too: compute.precision applies "
            "to every stage)",
            "cam: every train and val image, all labels in one fp32 pass per batch, at the measured CAM rate",
            f"enhance (CPU): the atlas pass over the training CAMs in one process, the counterfactual swap of "
            f"train and val images spread over {cores} cores; reading and writing the stores is not counted",
            "evaluate: inference and all-label CAMs of the test split; the sanity checks' twin training and "
            "the faithfulness metrics are not counted",
            "the first cycle has no enhancement; preparing the films (JPEG decode, resize) and segmenting them "
            "happen once, not per cycle, and are not counted",
            "phantom films stand in for CheXpert: the rates depend on the image size, not the content"],
    }


def run(s: Sizes, device: torch.device, amp: str, workers: tuple[int, ...]) -> tuple[dict, list[str]]:
    """Every measurement; a part that fails is recorded as its error and the others still run."""
    t0 = time.perf_counter()
    out: dict = {"machine": machine(device), "sizes": asdict(s), "workers": list(workers)}
    errors: list[str] = []

    def part(name: str, fn):
        try:
            out[name] = fn()
        except Exception as err:
            log.exception("%s failed", name)
            out[name] = {"error": f"{type(err).__name__}: {err}"}
            errors.append(name)

    part("train", lambda: bench_train(s, device, amp))
    with tempfile.TemporaryDirectory(prefix="cxr-bench-gpu-") as tmp:
        store = phantom_store(tmp, s.store_images, s.image_size, s.distinct)
        targets = phantom_targets(len(store), s.labels)
        part("loader", lambda: bench_loader(s, store, targets, Compute(device, amp), workers))
        part("cam", lambda: bench_cam(s, store, Compute(device, amp)))
    part("viewer", lambda: bench_viewer(s, device))
    part("enhance", lambda: bench_enhance(s))
    if not {"loader", "cam", "enhance"} & set(errors):
        most = f"{max(workers)}_workers"
        part("projection", lambda: projection(s, out["loader"]["training"][most]["images_per_s"],
                                              out["cam"][f"inference_{amp}_images_per_s"],
                                              out["cam"]["cam_images_per_s"], out["enhance"], available_cores(), amp))
    out["targets"] = {"amp_over_fp32": ">= 1.2",
                      f"loader wait_share with {max(workers)} workers": f"<= {BUSY_WAIT_SHARE}",
                      "refinement_cycle total_h": "<= 24 (a CheXpert cycle within a day on one GPU)"}
    try:
        out["meets_targets"] = {
            "amp_over_fp32": out["train"]["amp_over_fp32"] >= 1.2,
            "loader_keeps_device_busy": out["loader"]["training"][f"{max(workers)}_workers"]["keeps_device_busy"],
            "cycle_within_a_day": out["projection"]["refinement_cycle"]["total_h"] <= 24}
    except KeyError:
        out["meets_targets"] = None  # a part failed: see its error
    out["seconds"] = round(time.perf_counter() - t0, 1)
    dry = "" if device.type == "cuda" else " A dry run off the GPU: the figures only prove the code path."
    out["note"] = ("train: batches already on the device (the model's own rate); loader: the real training "
                   "loader on a phantom store, the worker counts trained epoch by epoch in turn, wait_share = time "
                   "waiting for the next batch over step time; cam/viewer: CAMs in fp32 always (pipeline/cam/"
                   "all_labels.py)." + dry)
    return out, errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu for a dry run (default cuda)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: proves the code path in seconds")
    parser.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16"),
                        help="the reduced precision compared with fp32 (auto: bf16 where supported, else fp16)")
    parser.add_argument("--workers", default=None,
                        help="loader worker counts, comma-separated (default 0,2,min(8, cores); --quick 0,1)")
    parser.add_argument("--out", default=OUT, help=f"JSON file to update (default {OUT})")
    args = parser.parse_args(argv)
    device = resolve(args.device)  # before anything is logged or written
    amp = amp_precision(device, args.amp)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    set_threads(0)  # every core, as a stage sets it (pipeline/compute.py)
    cores = available_cores()
    workers = (tuple(sorted({int(w) for w in args.workers.split(",")})) if args.workers
               else (0, 1) if args.quick else tuple(sorted({0, min(2, cores), min(8, cores)})))
    key = ("gpu_quick" if args.quick else "gpu") if device.type == "cuda" else f"gpu_dryrun_{device.type}"
    section, errors = run(QUICK if args.quick else FULL, device, amp, workers)
    result = read_json(args.out) if os.path.exists(args.out) else {}
    result[key] = section
    write_json(args.out, result)
    log.info("wrote %s [%s]%s", args.out, key, f"; failed: {', '.join(errors)}" if errors else "")
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
