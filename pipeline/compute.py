"""Where torch runs, in what precision and on how many threads (`compute` in params.yaml).

Every stage and the viewer go through here, so one setting moves the whole pipeline to a GPU:
- `device`: auto | cpu | cuda | cuda:N | mps; auto is CUDA when present (then MPS), else the CPU.
- `precision`: fp32 | bf16 | fp16, applied with `torch.autocast` around forward passes; fp16 trains
  with a GradScaler. bf16 autocast also runs on the CPU, which is how the path is tested here.
- `threads`: torch's intra-op threads, set explicitly by every stage: 0 means every core this process
  may use. Never inherited: a Dask LocalCluster exports OMP_NUM_THREADS=1 to what it starts, and a
  stage that read its thread count from the environment trained on one core and wrote other bytes
  than a plain `dvc repro` (float reductions are summed in another order on another thread count).
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# inherited thread settings that must not decide a stage's thread count
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS
        return max(1, os.cpu_count() or 1)


def set_threads(threads: int) -> int:
    """Set torch's intra-op threads to `threads` (0 = every available core); returns the count set."""
    n = threads or available_cores()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def clean_thread_env(env: dict[str, str]) -> dict[str, str]:
    """`env` without inherited single-thread settings, for a stage subprocess (see the module docstring)."""
    return {k: v for k, v in env.items() if k not in THREAD_ENV}


def check_device(spec: str) -> str:
    """`spec` if it is a device this machine has, else a ValueError saying what is there."""
    if not DEVICE_PATTERN.match(spec):
        raise ValueError(f"{spec!r} is not a device: use auto, cpu, cuda, cuda:N or mps")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"{spec!r} asked for, but torch sees no CUDA device here; use auto or cpu")
        index = int(spec.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ValueError(f"{spec!r} asked for, but torch sees {torch.cuda.device_count()} CUDA device(s)")
    if spec == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("'mps' asked for, but torch sees no MPS device here; use auto or cpu")
    return spec


def resolve_device(spec: str = "auto") -> torch.device:
    """The torch device `spec` names; auto: CUDA (the process's current device) when present, then MPS, else CPU."""
    if spec != "auto":
        return torch.device(check_device(spec))
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def check_precision(precision: str, device: torch.device) -> str:
    """fp16 autocast needs a GPU: on the CPU it is slow and unscaled gradients underflow."""
    if precision == "fp16" and device.type == "cpu":
        raise ValueError("compute.precision=fp16 needs a GPU (cuda or mps); use bf16 or fp32 on the CPU")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("compute.precision=bf16: this GPU has no bfloat16; use fp16 or fp32")
    return precision


def autocast(device: torch.device, precision: str = "fp32"):
    """A context in which forward passes run in `precision` (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler | None:
    """A GradScaler for fp16 (whose small gradients would underflow); None otherwise."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


def optimiser_step(loss: torch.Tensor, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None) -> None:
    """zero_grad, backward and step: through the GradScaler (fp16), else plainly. The classifier, the
    U-Net and the benchmarks all step this way."""
    opt.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        opt.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()


@dataclass(frozen=True)
class Compute:
    """A resolved `compute` section: the device and precision every torch call of a stage uses."""
    device: torch.device = torch.device("cpu")
    precision: str = "fp32"

    @classmethod
    def from_params(cls, p) -> "Compute":
        """`p`: pipeline.config.ComputeParams."""
        device = resolve_device(p.device)
        return cls(device, check_precision(p.precision, device))

    def autocast(self):
        return autocast(self.device, self.precision)


CPU = Compute()


def task_compute(spec) -> Compute:
    """The Compute of a shard task (pipeline/engine.py), resolved where the task runs: the driver sends
    the `compute` params section, which pickles, not a torch.device, because a Dask worker may have
    another GPU or none (`auto` is then that worker's own device). None is the CPU in fp32."""
    return CPU if spec is None else Compute.from_params(spec)
