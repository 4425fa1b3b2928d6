"""Where shard-sized work runs: in this process, or as Dask tasks on a LocalCluster or a real cluster.

The embarrassingly parallel stages (prepare, segmentation predict, CAM, enhance) split their rows
into shard-sized tasks and map a top-level function over them; the driver writes the results, in
task order, into one sharded store. Tasks are pure functions of their arguments (paths, row
indices, params), so the stored bytes are the same on every engine, and the driver holds at most
`in_flight` results, so memory stays flat at any dataset size.

A real cluster needs the project's data directory on storage every worker can read (NFS, a shared
volume), and this package installed on the workers. `$CXR_DASK_ADDRESS` overrides
`engine.address` (the refine flow sets it so that every stage shares one cluster) and
`$CXR_ENGINE=local|dask` overrides `engine.kind`.
"""
from __future__ import annotations

import copy
import logging
import os
from collections import deque
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator

from pipeline.config import EngineParams

log = logging.getLogger(__name__)

ADDRESS_ENV = "CXR_DASK_ADDRESS"
KIND_ENV = "CXR_ENGINE"
# dask's config from the environment, read when a process imports distributed: a worker's log level
QUIET_WORKERS_ENV = {"DASK_DISTRIBUTED__LOGGING__DISTRIBUTED": "warning"}
_worker_cache: dict = {}


def resolve(p: EngineParams) -> EngineParams:
    """`p` with the environment's overrides applied."""
    update = {}
    if os.environ.get(KIND_ENV):
        update["kind"] = os.environ[KIND_ENV]
    if os.environ.get(ADDRESS_ENV):
        update["address"] = os.environ[ADDRESS_ENV]
    return EngineParams.model_validate({**p.model_dump(), **update}) if update else p


def shard_slices(n: int, shard_size: int) -> list[slice]:
    """[0, n) cut into consecutive shard-sized slices: the unit of one task and one stored shard."""
    return [slice(start, min(start + shard_size, n)) for start in range(0, n, shard_size)]


def cached(key: tuple, factory: Callable[[], Any]) -> Any:
    """A per-process cache of one value (a loaded model, an opened store): each worker loads the
    previous cycle's model once, not once per task. Keys should include a file's mtime and size."""
    if key not in _worker_cache:
        _worker_cache.clear()
        _worker_cache[key] = factory()
    return _worker_cache[key]


def file_key(path: str | os.PathLike) -> tuple:
    st = os.stat(path)
    return str(path), st.st_mtime_ns, st.st_size


def _call(fn: Callable, threads: int, args: tuple) -> Any:
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return fn(*args)


class Engine:
    """`map(fn, tasks)`: fn(*args) for each args tuple of `tasks`, results yielded in task order."""

    def __init__(self, p: EngineParams, client=None):
        self.p, self.client = p, client
        workers = len(client.scheduler_info()["workers"]) if client is not None else 1
        self.workers = max(1, workers)
        self.in_flight = p.in_flight or 2 * self.workers
        self.description = ("in-process" if client is None
                            else f"Dask at {client.scheduler.address} ({self.workers} workers)")

    def map(self, fn: Callable, tasks: Iterable[tuple]) -> Iterator[Any]:
        if self.client is None:
            for args in tasks:
                yield fn(*args)
            return
        pending: deque = deque()
        try:
            for args in tasks:  # consumed lazily: the task list itself may be a stream (prepare)
                pending.append(self.client.submit(_call, fn, self.p.threads_per_worker, tuple(args), pure=False))
                if len(pending) >= self.in_flight:
                    yield self._take(pending)
            while pending:
                yield self._take(pending)
        finally:
            for fut in pending:
                fut.cancel()

    @staticmethod
    def _take(pending: deque) -> Any:
        fut = pending.popleft()
        try:
            return fut.result()
        finally:
            fut.release()


def quiet_dask() -> None:
    """Dask's INFO lines (a scheduler and its workers starting, every client connecting and leaving)
    tell a run nothing; its warnings stay. distributed only attaches its own handler (which
    LocalCluster's `silence_logs` quiets) when the root logger has none, so under Prefect's logging its
    records reach the console through the root handler: the `distributed` logger's level filters them."""
    logging.getLogger("distributed").setLevel(max(logging.WARNING, logging.getLogger().level))


def in_process() -> Engine:
    """The engine that runs every task here, in order (the reference the Dask engine must match)."""
    return Engine(EngineParams(kind="local"))


@contextmanager
def open_engine(p: EngineParams, device: str = "auto") -> Iterator[Engine]:
    """The engine `p` asks for (after `resolve`): in-process, a client of `address`, or a LocalCluster
    that lives as long as the `with` block (one worker per GPU when `device`, compute.device, means CUDA)."""
    p = resolve(p)
    if p.kind == "local":
        yield Engine(p)
        return
    from distributed import Client

    quiet_dask()
    if p.address:
        with Client(p.address, set_as_default=False) as client:
            engine = Engine(p, client)
            log.info("engine: %s", engine.description)
            yield engine
        return
    with local_cluster(p, device) as cluster, Client(cluster, set_as_default=False) as client:
        engine = Engine(p, client)
        log.info("engine: %s", engine.description)
        yield engine


def local_cluster(p: EngineParams, device: str = "auto"):
    """A LocalCluster sized by `p` (one task at a time per worker process; torch threads per task
    from `p.threads_per_worker`); the refine flow starts one and shares it across its stages.

    When `device` (compute.device) is auto or cuda and CUDA devices are visible, each worker owns one
    GPU: its CUDA_VISIBLE_DEVICES names that GPU alone, so a task's `cuda` is its worker's own card
    and N GPUs run N shard streams side by side (`p.workers` or one per GPU; more workers than GPUs
    share them round-robin). Workers start with no CUDA context, so the variable, applied by each
    worker's Nanny before any task runs, takes effect. `cuda:N` keeps every GPU visible to every worker.

    Dask logs warnings only (`quiet_dask`), here and in the workers: a worker process reads its log
    level from the environment its Nanny spawns it with (distributed.nanny.pre-spawn-environ)."""
    import dask
    from distributed import LocalCluster

    from pipeline import distributed as ddp

    quiet_dask()
    options = dict(threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None,
                   silence_logs=logging.WARNING,
                   scheduler_kwargs={"dashboard_address": "127.0.0.1:0"})  # health routes only, any free port
    spawn_env = {**dask.config.get("distributed.nanny.pre-spawn-environ", {}), **QUIET_WORKERS_ENV}
    gpus = ddp.visible_gpus(device)
    with dask.config.set({"distributed.nanny.pre-spawn-environ": spawn_env}):  # read as each Nanny is made
        if not gpus:
            return LocalCluster(n_workers=p.workers or os.cpu_count() or 1, **options)
        n = p.workers or len(gpus)
        # started empty, then one spec per worker: LocalCluster's `env=` would give every worker the same GPUs
        cluster = LocalCluster(n_workers=0, memory_limit=1 / n, **options)
        try:
            for i in range(n):
                spec = copy.deepcopy(cluster.new_spec)
                spec["options"]["env"] = {**spec["options"].get("env", {}), "CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)]}
                cluster.worker_spec[f"gpu{i}"] = spec
            # start them now, as LocalCluster's constructor does its own (and as dask-cuda's LocalCUDACluster
            # does): a worker that cannot start raises here instead of leaving the cluster short
            cluster.sync(cluster._correct_state)
        except BaseException:
            cluster.close()
            raise
    log.info("LocalCluster: %d workers on GPUs %s", n, ", ".join(gpus[i % len(gpus)] for i in range(n)))
    return cluster
