"""`make bench`: speed figures on this machine, written to reports/benchmarks.json.

Each benchmark is a function returning a dict; the machine's description sits beside the figures.
"""
from __future__ import annotations

import logging
import os
import platform
import time

import numpy as np
import torch

from pipeline.cam.library import LabelCAM
from pipeline.io import read_json, write_json
from pipeline.models.registry import create_model

log = logging.getLogger("benchmarks")
OUT = "reports/benchmarks.json"


def _time(fn, repeats: int = 3) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times)) * 1000


def bench_cam(archs=("resnet50", "densenet121"), labels: int = 14, size: int = 224) -> dict:
    """One image, 14 labels: a plain forward vs grad-cam's per-label loop."""
    out = {}
    for arch in archs:
        torch.manual_seed(0)
        model = create_model(arch, labels).eval()
        x = torch.randn(1, 3, size, size)
        with torch.no_grad():
            forward = _time(lambda: model(x))
        cam = LabelCAM(model, arch)
        loop = _time(lambda: cam(x, labels), repeats=1)
        cam.release()
        out[arch] = {"forward_ms": round(forward, 1), "gradcam_loop_ms": round(loop, 1),
                     "gradcam_loop_over_forward": round(loop / forward, 1)}
        log.info("%s: %s", arch, out[arch])
    return out


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
    ms = _time(step)
    return {arch: {"train_images_per_s": round(batch / ms * 1000, 1), "image_size": size}}


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = read_json(OUT) if os.path.exists(OUT) else {}
    result["machine"] = {"cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                         "platform": platform.platform(), "processor": platform.processor()}
    result["cam"] = bench_cam()
    result["train"] = bench_train()
    write_json(OUT, result)
    log.info("wrote %s", OUT)


if __name__ == "__main__":
    main()
