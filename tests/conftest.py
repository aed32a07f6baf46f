"""A one-process torch.distributed + megatron parallel_state for in-process tests."""

from __future__ import annotations

import os

import pytest
import torch

# Triton kernels are checked on CPU by Triton's interpreter. It must be on before any @triton.jit
# decorator runs (i.e. before gorilla_dist.kernels is imported); on a GPU machine they run for real.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def world1():
    """torch.distributed (gloo, world 1) + megatron parallel_state with TP=1, for in-process tests."""
    from launcher.backends import free_port

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()))
    from omegaconf import OmegaConf

    from gorilla_dist.config import ParallelConfig
    from gorilla_dist.parallel import init_distributed, teardown
    from gorilla_dist.worker import quiet_libraries

    quiet_libraries()
    layout = init_distributed(OmegaConf.structured(ParallelConfig))
    yield layout
    teardown()
