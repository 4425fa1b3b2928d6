"""torchrun (DDP) helpers: the train stage runs unchanged with one process or under `torchrun`.

Without torchrun's environment (WORLD_SIZE unset or 1) every helper is a no-op that answers as a
single process would, so single-process runs take exactly the code path they always took.
Backend: follows `compute.device` (`setup(spec)`): NCCL with each rank on `cuda:LOCAL_RANK` when it
resolves to CUDA, else gloo on the CPU (each rank on its share of the cores, `rank_threads`).

`launch` is how `train.nproc_per_node: N` reaches torchrun from `dvc repro` and the Prefect flow: the
stage process becomes the parent of `torchrun --standalone`, forwards SIGTERM/SIGINT to it and exits
with its status; the ranks die with torchrun even when it is SIGKILLed (`die_with_parent`), so a killed
run leaves no rank writing behind the next one's back.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

TORCHRUN_ENV = ("WORLD_SIZE", "LOCAL_RANK")  # set by torchrun in every rank
PARENT_ENV = "CXR_DDP_PARENT"  # pid of the process that started torchrun (then: of torchrun, for its ranks)


def _env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def under_torchrun() -> bool:
    """True in a process torchrun started (a rank), which must not launch torchrun again."""
    return any(var in os.environ for var in TORCHRUN_ENV)


def uses_cuda(spec: str | None) -> bool:
    """Whether ranks train on GPUs for compute.device `spec` (None: whenever CUDA is there, the rule of
    a hand-launched script). MPS has no DDP backend: `auto` on a Mac trains on the CPU (gloo)."""
    if spec is None or spec == "auto":
        return torch.cuda.is_available()
    if spec == "mps":
        raise ValueError("DDP runs on CUDA (NCCL) or the CPU (gloo), not MPS: set compute.device to cpu "
                         "or train.nproc_per_node to 1")
    return spec.startswith("cuda")


def check_gpus(spec: str | None, nproc: int) -> None:
    """A ValueError unless each of `nproc` ranks can have a GPU of its own (when `spec` means CUDA)."""
    if nproc > 1 and uses_cuda(spec):
        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if have < nproc:
            raise ValueError(f"train.nproc_per_node={nproc} with compute.device={spec!r} needs {nproc} CUDA "
                             f"devices, one per rank; torch sees {have}. Lower nproc_per_node or train on "
                             f"the CPU (compute.device: cpu)")


def rank_threads(threads: int, nproc: int | None = None) -> int:
    """torch threads of one of `nproc` ranks on this node (default: torchrun's LOCAL_WORLD_SIZE): the
    node's `threads` (0 = every available core) split evenly, at least 1, so N gloo ranks on a few
    cores do not oversubscribe them."""
    from pipeline.compute import available_cores

    nproc = nproc or int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, (threads or available_cores()) // max(1, nproc))


def is_distributed() -> bool:
    """True once a process group with more than one rank is up."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def setup(spec: str | None = None, threads: int | None = None) -> bool:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*); False if alone.

    `spec`: compute.device, which picks the backend (see `uses_cuda`); `threads`: compute.threads,
    of which this rank takes its share (`rank_threads`)."""
    if _env_world_size() <= 1 or not dist.is_available():
        return False
    # torchrun starts ranks in sessions of their own, which a killpg of the stage's group misses
    die_with_parent(signal.SIGKILL, _parent_from_env())
    if threads is not None:
        from pipeline.compute import set_threads

        set_threads(rank_threads(threads))
    if not dist.is_initialized():
        use_cuda = uses_cuda(spec)
        if use_cuda:
            check_gpus(spec, int(os.environ.get("LOCAL_WORLD_SIZE", _env_world_size())))
            torch.cuda.set_device(local_rank())
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", init_method="env://")
        log.info("process group up: %d ranks, backend %s, %d thread(s) per rank", world_size(),
                 dist.get_backend(), torch.get_num_threads())
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


def device(spec: str = "cpu") -> torch.device:
    """Where this rank trains. Under DDP the backend decides (it followed compute.device in `setup`):
    its own `cuda:LOCAL_RANK` under NCCL, else the CPU. Single-process: `spec` resolved
    (pipeline.compute.resolve_device); the default "cpu" is what callers that pass no spec always got."""
    if is_distributed():
        if dist.get_backend() == "nccl":
            return torch.device("cuda", local_rank())
        return torch.device("cpu")
    from pipeline.compute import resolve_device

    return resolve_device(spec)


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


# ---------------------------------------------------------------- launching torchrun from a stage


def die_with_parent(sig: int = signal.SIGTERM, parent: int | None = None) -> None:
    """Have Linux send `sig` to this process when its parent dies, even by SIGKILL (no-op elsewhere).

    `parent`: the pid the parent had when it started us; if it is already gone (we were reparented
    while importing), `sig` comes now. Without it, only a death during this call is caught."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = parent or os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(sig), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - no libc prctl
        return
    if os.getppid() != parent:
        os.kill(os.getpid(), sig)


def _parent_from_env() -> int | None:
    return int(os.environ[PARENT_ENV]) if os.environ.get(PARENT_ENV, "").isdigit() else None


def _torchrun_main() -> None:
    """torchrun's own entry point, in a process that ends with the stage that launched it."""
    die_with_parent(signal.SIGTERM, _parent_from_env())  # torchrun's SIGTERM handler stops its ranks
    os.environ[PARENT_ENV] = str(os.getpid())  # the ranks' parent, for their own `die_with_parent`
    from torch.distributed.run import main

    main()


def torchrun_command(module: str, nproc: int, args: list[str]) -> list[str]:
    """`python -m torch.distributed.run --standalone --nproc_per_node N -m <module> <args>`, through
    `_torchrun_main` (which adds only the parent-death signal)."""
    return [sys.executable, "-c", "from pipeline.distributed import _torchrun_main; _torchrun_main()",
            "--standalone", "--nproc_per_node", str(nproc), "-m", module, *args]


def launch(module: str, nproc: int, args: list[str], spec: str | None = None, threads: int = 0) -> int:
    """Run `python -m <module> <args>` as `nproc` torchrun ranks on this machine, in the foreground:
    their output streams through this process's stdout/stderr, SIGTERM and SIGINT are forwarded to
    torchrun (which stops the ranks), and the exit status is torchrun's (128 + N if a signal ended it).

    Checks before starting anything that each rank gets a GPU when `spec` (compute.device) means CUDA.
    """
    check_gpus(spec, nproc)
    # the ranks set their threads themselves (`setup`); OMP_NUM_THREADS only keeps torchrun from
    # warning that it set 1, and covers what runs before the ranks set theirs
    env = {**{k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                   "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                                                                   "MASTER_PORT")},
           "OMP_NUM_THREADS": str(rank_threads(threads, nproc)), PARENT_ENV: str(os.getpid())}
    cmd = torchrun_command(module, nproc, args)
    log.info("launching %d ranks (%s): torchrun --standalone --nproc_per_node %d -m %s %s", nproc,
             "NCCL, one GPU each" if uses_cuda(spec) else "gloo on the CPU", nproc, module, " ".join(args))
    proc = subprocess.Popen(cmd, env=env)

    def forward(signum, _frame):
        log.warning("got signal %d: stopping the ranks", signum)
        try:
            proc.send_signal(signum)
        except ProcessLookupError:  # pragma: no cover - already gone
            pass

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if proc.poll() is None:  # only on an exception in wait(): leave no torchrun behind
            proc.terminate()
            proc.wait()
    if code:
        log.error("torchrun exited with status %d", code)
    return 128 - code if code < 0 else code


def visible_gpus(spec: str = "auto") -> list[str]:
    """The CUDA devices, as CUDA_VISIBLE_DEVICES names them, that one-GPU-per-process work (Dask
    workers) may split among its processes: those this process sees when `spec` (compute.device) is
    auto or cuda; none on the CPU, MPS, or with `cuda:N` (one chosen card, seen by every process)."""
    if spec not in ("auto", "cuda") or not torch.cuda.is_available():
        return []
    count = torch.cuda.device_count()
    listed = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return listed[:count] if listed else [str(i) for i in range(count)]
