"""torchrun (DDP) helpers: the train stage runs unchanged with one process or under `torchrun`.

Without torchrun's environment (WORLD_SIZE unset or 1) every helper is a no-op that answers as a
single process would, so single-process runs take exactly the code path they always took.
Backend: NCCL when CUDA is available (each rank on `cuda:LOCAL_RANK`), else gloo on the CPU.
"""
from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def _env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_distributed() -> bool:
    """True once a process group with more than one rank is up."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def setup() -> bool:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*); False if alone."""
    if _env_world_size() <= 1 or not dist.is_available():
        return False
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(local_rank())
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", init_method="env://")
        log.info("process group up: %d ranks, backend %s", world_size(), dist.get_backend())
    return True


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Only rank 0 writes files and logs progress."""
    return rank() == 0


def device() -> torch.device:
    """Where this rank trains: its own GPU under NCCL, else the CPU (always the CPU single-process)."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_object(obj):
    """Rank 0's value of `obj` on every rank (identity single-process)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj) -> list:
    """Every rank's `obj`, in rank order ([obj] single-process)."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Overwrite every rank's buffers (BatchNorm statistics) with rank 0's."""
    if is_distributed():
        for buf in module.buffers():
            dist.broadcast(buf, src=0)
