"""Starting torch.distributed through DeepSpeed (so its comm layer is set up too), after checking the
installed library versions. Adaptation: on CPU, DeepSpeed's shared-memory allreduce op is not built."""

from __future__ import annotations

import datetime
import itertools
import pickle
import sys
import time

import torch

from gorilla_dist.engine.versions import check_versions


def skip_shm_build() -> None:
    """DeepSpeed's CPU accelerator JIT-compiles a shared-memory allreduce op (~30 s, needs g++/ninja)
    the first time its comm backend starts. We reduce through gloo on CPU, which is exact and fast
    enough for CPU ranks, so we replace `build_shm_op` (deepspeed/comm/torch.py) with "not available"
    — the same answer it gives on machines where the op cannot be built."""
    import deepspeed.comm.torch  # noqa: F401

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


_STORE = None  # the rendezvous store (rank 0 or torchrun's agent hosts it), kept for census()


def census(rank: int, world: int, grace_s: float) -> list[int] | None:
    """After a collective failed: the ranks that answer through the rendezvous store within grace_s (each
    survivor writes its key; a killed or unplugged rank never does); None when the store itself does not
    answer (its host, rank 0's, is gone or unreachable from here)."""
    if _STORE is None:
        return None
    key = "gorilla_dist/census/{}".format
    try:
        _STORE.set_timeout(datetime.timedelta(seconds=grace_s))
        _STORE.set(key(rank), "1")
        deadline = time.monotonic() + grace_s
        while True:
            alive = [r for r in range(world) if _STORE.check([key(r)])]
            if len(alive) == world or time.monotonic() > deadline:
                return alive
            time.sleep(0.2)
    except RuntimeError:  # DistError / DistNetworkError: the store's host is gone
        return None


_SHARED = itertools.count()


def share_from_main(value, is_main: bool, poll_s: float = 0.2):
    """Rank 0's `value` on every rank, through the rendezvous store rather than a collective: the other ranks
    wait for as long as rank 0 works (preparing data can take hours). A collective would wait at most
    parallel.timeout_s, and under NCCL its watchdog then aborts the process (SIGABRT, no message); the
    store answers while its host lives (rank 0's, or torchrun's agent, which ends the job if rank 0 dies).
    Call on every rank, in the same order (the keys are numbered)."""
    key = f"gorilla_dist/on_main/{next(_SHARED)}"
    if is_main:
        _STORE.set(key, pickle.dumps(value))
        return value
    while not _STORE.check([key]):
        time.sleep(poll_s)
    return pickle.loads(_STORE.get(key))  # (our own rank 0's bytes, through our own store)


def init_process_group(device: torch.device, timeout_s: float, rendezvous_timeout_s: float, *,
                       deepspeed: bool = True) -> None:
    """torch.distributed through DeepSpeed (so its comm layer is initialised too): nccl on GPUs, gloo
    on CPUs. Every process of the framework that uses torch.distributed starts here, so the version
    check runs before any adaptation is applied.

    The rendezvous (MASTER_ADDR:MASTER_PORT; under torchrun its agent's store) has its own time limit:
    rank 0 waits that long for every rank to join, the others that long to reach rank 0's address. Then
    the store and every collective get `timeout_s`. DeepSpeed adopts the process group started here.
    deepspeed=False (the tools that only read a checkpoint into one process: generate, evaluate, export,
    consolidate) starts plain torch.distributed and never imports DeepSpeed (~0.5-1 s of start-up)."""
    check_versions()
    import torch.distributed as dist
    from torch.distributed.rendezvous import rendezvous

    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    global _STORE
    store, rank, world = next(rendezvous("env://", timeout=datetime.timedelta(seconds=rendezvous_timeout_s)))
    store.set_timeout(timeout)
    _STORE = store
    # as DeepSpeed does on cuda: bind the device, so NCCL starts eagerly (not in a world of one)
    device_id = {"device_id": device} if device.type == "cuda" and world > 1 else {}
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout, **device_id)
    if deepspeed:
        import deepspeed as ds

        if device.type != "cuda":
            skip_shm_build()
        ds.init_distributed(dist_backend=backend, timeout=timeout, verbose=False)
