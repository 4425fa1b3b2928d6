"""`make bench`: speed figures on this machine, written to reports/benchmarks.json.

Each benchmark is a function returning a dict; the machine's description sits beside the figures,
and each section states the targets it is held to (`targets`, `meets_targets`).
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import tempfile

import numpy as np
import torch

from pipeline.cam.all_labels import AllLabelCAM, dataset_cams
from pipeline.cam.library import LibraryCAM, library_sees_layer_output
from pipeline.cam.maps import resize
from pipeline.data.dataset import iterate_batches, predict
from benchmarks.timing import median_ms
from pipeline.config import Paths
from pipeline.io import read_json, write_json
from pipeline.models.registry import create_model
from benchmarks.input_pipeline import bench_input_pipeline, phantom_store
from benchmarks.scale import bench_cam_memory, bench_cam_workers, bench_dvc_noop
from benchmarks.viewer import bench_viewer

log = logging.getLogger("benchmarks")
OUT = Paths().benchmarks


def bench_cam(archs=("resnet50", "densenet121"), labels: int = 14, size: int = 224) -> dict:
    """One image, every label: a plain forward, the one-pass all-label CAM, grad-cam's per-label loop."""
    out = {}
    for arch in archs:
        torch.manual_seed(0)
        model = create_model(arch, labels, image_size=size).eval()
        x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            forward = median_ms(lambda: model(x), 7)
        cam = AllLabelCAM(model, arch)
        fast = median_ms(lambda: cam(x), 7)
        with library_sees_layer_output(), LibraryCAM(model, arch) as lib:
            loop = median_ms(lambda: lib(x, list(range(labels))), 2)
            ref = lib(x, list(range(labels)))
        diff = float(np.abs(resize(cam(x), size).numpy() - ref).max())
        out[arch] = {"forward_ms": round(forward, 1), "all_label_cam_ms": round(fast, 1),
                     "gradcam_loop_ms": round(loop, 1), "speedup_vs_gradcam_loop": round(loop / fast, 1),
                     "cam_over_forward": round(fast / forward, 3), "max_abs_diff": diff,
                     "labels": labels, "image_size": size}
        log.info("cam %s: %s", arch, out[arch])
    out["targets"] = {"cam_over_forward": "<= 1.3", "speedup_vs_gradcam_loop": ">= 25", "max_abs_diff": "<= 1e-4"}
    out["meets_targets"] = all(out[a]["cam_over_forward"] <= 1.3 and out[a]["speedup_vs_gradcam_loop"] >= 25
                               and out[a]["max_abs_diff"] <= 1e-4 for a in archs)
    return out


def bench_cam_dataset(setups=(("tinyvgg", 128, 4, 64, 512), ("resnet50", 224, 14, 16, 64))) -> dict:
    """Images/s over a phantom store: all-label CAMs as float16 vs plain inference."""
    out = {}
    for arch, size, labels, batch, n in setups:
        with tempfile.TemporaryDirectory() as tmp:
            out[arch] = _dataset_throughput(phantom_store(tmp, n, size), arch, size, labels, batch)
        log.info("dataset cam %s: %s", arch, out[arch])
    out["targets"] = {"cam_over_inference_throughput": ">= 0.8"}
    out["meets_targets"] = all(v["cam_over_inference_throughput"] >= 0.8 for k, v in out.items() if k != "targets")
    return out


def _dataset_throughput(store, arch: str, size: int, labels: int, batch: int) -> dict:
    n = len(store)
    idx = np.arange(n)
    torch.manual_seed(0)
    model = create_model(arch, labels, image_size=size).eval()
    infer = median_ms(lambda: predict(model, store, idx, batch), 3)
    cams = median_ms(lambda: list(dataset_cams(model, arch, (x for x, _, _ in iterate_batches(store, idx, None, batch)))), 3)
    return {"image_size": size, "labels": labels, "batch_size": batch, "images": n,
            "inference_images_per_s": round(n / infer * 1000, 1), "cam_images_per_s": round(n / cams * 1000, 1),
            "cam_over_inference_throughput": round(infer / cams, 3)}


def bench_train(arch: str = "tinyvgg", size: int = 128, batch: int = 64) -> dict:
    torch.manual_seed(0)
    model = create_model(arch, 4).train()
    opt = torch.optim.AdamW(model.parameters())
    x, y = torch.randn(batch, 3, size, size), torch.rand(batch, 4).round()

    def step():
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    ms = median_ms(step)
    return {arch: {"train_images_per_s": round(batch / ms * 1000, 1), "image_size": size}}


def bench_road_imputer(size: int = 128, percentiles=(20, 40, 60, 80)) -> dict:
    """One film's ROAD imputations (MoRF and LeRF at each percentile): grad-cam's imputer vs ours."""
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer

    from pipeline.metrics.faithfulness import SparseImputer

    rng = np.random.default_rng(0)
    img = torch.from_numpy(rng.normal(size=(1, size, size)).astype(np.float32))
    cam = rng.random((size, size))
    masks = [torch.from_numpy(m.astype(np.float32)) for p in percentiles
             for m in (cam < np.percentile(cam, p), cam >= np.percentile(cam, p))]

    def film(imputer):
        return lambda: [imputer(img, m) for m in masks]
    lib, ours = median_ms(film(NoisyLinearImputer()), 5), median_ms(film(SparseImputer()), 5)
    out = {"gradcam_ms_per_film": round(lib, 1), "ours_ms_per_film": round(ours, 1),
           "speedup": round(lib / ours, 2), "image_size": size, "imputations_per_film": len(masks),
           "targets": {"speedup": ">= 1.3"}}
    out["meets_targets"] = out["speedup"] >= 1.3
    log.info("road imputer: %s", out)
    return out


BENCHES = {"cam": bench_cam, "cam_dataset": bench_cam_dataset, "train": bench_train, "viewer": bench_viewer,
           "cam_memory": bench_cam_memory, "cam_workers": bench_cam_workers, "dvc_noop": bench_dvc_noop,
           "input_pipeline": bench_input_pipeline, "road_imputer": bench_road_imputer}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run")
    parser.add_argument("names", nargs="*", default=list(BENCHES), help=f"any of {', '.join(BENCHES)}")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = read_json(OUT) if os.path.exists(OUT) else {}
    result["machine"] = {"cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                         "platform": platform.platform(), "processor": platform.processor()}
    for name in args.names:
        result[name] = BENCHES[name]()
        write_json(OUT, result)
    log.info("wrote %s", OUT)


if __name__ == "__main__":
    main()
