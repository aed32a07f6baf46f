"""A one-process torch.distributed + megatron parallel_state for in-process tests."""

from __future__ import annotations

import os

import pytest
import torch

# Triton kernels are checked on CPU by Triton's interpreter. It must be on before any @triton.jit
# decorator runs (i.e. before gorilla_dist.kernels is imported); on a GPU machine they run for real.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


CLUSTER = {"test_slurm.py", "test_multinode.py", "test_fault_tolerance.py"}
"""Tests that share the Slurm clusters or measure how long a failure takes to be reported: one after
another on one pytest-xdist worker (the `cluster` group), never beside each other."""


def pytest_collection_modifyitems(config, items):
    """Multi-process and end-to-end tests (tests/distributed, tests/integration) are `slow`:
    `pytest -m "not slow"` is the inner loop (unit tests, a couple of minutes); CI runs everything.

    pytest-xdist (pyproject's `-n 2 --dist loadgroup`) runs two tests at a time: a test mostly waits on
    one process (a tool, a one-rank run, a scheduler), so the second CPU core is otherwise idle. The
    CLUSTER files run in one group; every other integration file is a group of its own, so that its
    module fixtures (a trained base model, a checkpoint) are built once, on one worker; unit and
    distributed tests go to whichever worker is free."""
    for item in items:
        folder, name = item.path.parent.name, item.path.name
        if folder in ("distributed", "integration"):
            item.add_marker(pytest.mark.slow)
        if name in CLUSTER:
            item.add_marker(pytest.mark.xdist_group("cluster"))
        elif folder == "integration":
            item.add_marker(pytest.mark.xdist_group(name))


@pytest.fixture(scope="session")
def world1():
    """torch.distributed (gloo, world 1) + megatron parallel_state with TP=1, for in-process tests."""
    from gorilla_dist.parallel import init_single_process, teardown
    from gorilla_dist.runtime import quiet_libraries

    quiet_libraries()
    # Scoped: subprocesses started by later tests (launchers, torchrun, sbatch) must not inherit RANK or
    # MASTER_PORT (init_single_process sets them only while it starts).
    layout = init_single_process()
    yield layout
    teardown()
