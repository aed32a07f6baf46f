"""A one-process torch.distributed + megatron parallel_state for in-process tests."""

from __future__ import annotations

import collections
import os

import pytest
import torch

# Triton kernels are checked on CPU by Triton's interpreter. It must be on before any @triton.jit
# decorator runs (i.e. before gorilla_dist.kernels is imported); on a GPU machine they run for real.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    """Multi-process and end-to-end tests (tests/distributed, tests/integration) are `slow`:
    `pytest -m "not slow"` is the inner loop (unit tests, a couple of minutes); CI runs everything.

    pytest-xdist (pyproject's `-n 2 --dist loadfile`) runs two test files at a time: a test mostly waits
    on one process (a tool, a one-rank run, a scheduler), so the second CPU core is otherwise idle. A file
    stays on one worker, so its module fixtures (a Slurm cluster, a trained base, a checkpoint) are built
    once and never torn down under another test. (`--dist loadgroup` would be finer, but with pytest 9.2
    xdist 3.8 cannot rename the grouped tests' node ids, so its groups have no effect.)"""
    for item in items:
        if item.path.parent.name in ("distributed", "integration"):
            item.add_marker(pytest.mark.slow)


_FILE_SECONDS: collections.Counter = collections.Counter()


def pytest_runtest_logreport(report):
    """Seconds per test file (setup + call + teardown; with xdist, the workers' reports reach here)."""
    _FILE_SECONDS[report.nodeid.split("::")[0]] += report.duration


def pytest_terminal_summary(terminalreporter):
    """The files that set the suite's wall time: one xdist worker runs a whole file (see above)."""
    if _FILE_SECONDS:
        total = sum(_FILE_SECONDS.values())
        terminalreporter.write_sep("=", f"slowest files (setup + call + teardown; all files: {total:.0f} s)")
        for path, seconds in _FILE_SECONDS.most_common(15):
            terminalreporter.write_line(f"{seconds:8.1f}s {path}")


@pytest.fixture(scope="session")
def world1():
    """torch.distributed (gloo, world 1) + megatron parallel_state with TP=1, for in-process tests: on the CPU
    (and DeepSpeed's CPU accelerator) also on a machine with a GPU; the GPU-marked tests use CUDA."""
    from gorilla_dist.parallel import init_single_process, teardown
    from gorilla_dist.runtime import quiet_libraries

    os.environ["DS_ACCELERATOR"] = "cpu"  # (a worker sets its own from its device: gorilla_dist/worker.py)
    quiet_libraries()
    # Scoped: subprocesses started by later tests (launchers, torchrun, sbatch) must not inherit RANK or
    # MASTER_PORT (init_single_process sets them only while it starts).
    layout = init_single_process(device="cpu")
    yield layout
    teardown()
