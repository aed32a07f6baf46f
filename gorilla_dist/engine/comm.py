"""Starting torch.distributed through DeepSpeed (so its comm layer is set up too), after checking the
installed library versions. Adaptation: on CPU, DeepSpeed's shared-memory allreduce op is not built."""

from __future__ import annotations

import datetime
import sys

import torch

from gorilla_dist.engine.versions import check_versions


def skip_shm_build() -> None:
    """DeepSpeed's CPU accelerator JIT-compiles a shared-memory allreduce op (~30 s, needs g++/ninja)
    the first time its comm backend starts. We reduce through gloo on CPU, which is exact and fast
    enough for CPU ranks, so we replace `build_shm_op` (deepspeed/comm/torch.py) with "not available"
    — the same answer it gives on machines where the op cannot be built."""
    import deepspeed.comm.torch  # noqa: F401

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def init_process_group(device: torch.device, timeout_s: float) -> None:
    """torch.distributed through DeepSpeed (so its comm layer is initialised too): nccl on GPUs, gloo
    on CPUs. Every process of the framework that uses torch.distributed starts here, so the version
    check runs before any adaptation is applied."""
    check_versions()
    import deepspeed

    if device.type != "cuda":
        skip_shm_build()
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo",
                               timeout=datetime.timedelta(seconds=timeout_s), verbose=False)
