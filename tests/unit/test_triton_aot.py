"""The block-sparse Triton kernels compiled ahead of time for sm_80 / sm_90 on this CPU machine (Triton's own
ptxas): the shipped shared-memory table is what the compiler says (a sample recompiled here), complete and
consistent, and the launch plan keeps every launch inside the GPU's shared memory: the deepest pipelining that
fits, or the block-gather path with the reason, said once."""

import os
import subprocess
import sys
import warnings
from types import SimpleNamespace

import pytest
import torch

from gorilla_dist.kernels import block_sparse, shared_memory
from gorilla_dist.kernels.limits import BLOCK_SIZES, TRITON_HEAD_DIMS
from helpers import REPO

TABLE = shared_memory.load_table()["shared_bytes"]
H100, A100, A10 = 232448, 166912, 101376


def test_a_sample_of_the_table_recompiles_to_the_same_shared_memory(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "gorilla_dist.kernels.triton_aot", "--sample", "4", "--jobs", "2",
                           "--seed", "3"], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**env, "TRITON_CACHE_DIR": str(tmp_path)})  # (an empty cache: really compiled)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("bytes (table ") == 4


def test_the_table_covers_every_shape_and_grows_with_the_tiles():
    for arch in shared_memory.ARCHS:
        for dtype in shared_memory.DTYPES:
            for kernel in shared_memory.KERNELS:
                for stages in shared_memory.STAGES:
                    row = {(b, d): TABLE[shared_memory.key(kernel, b, d, dtype, arch, stages)]
                           for b in BLOCK_SIZES for d in TRITON_HEAD_DIMS}
                    limit = shared_memory.SHARED_MEMORY[arch]
                    for (b, d), need in row.items():
                        smaller = [row[s] for s in row if s[0] <= b and s[1] <= d and s != (b, d)]
                        if need is None:  # not compiled: a smaller shape already exceeds the target
                            assert any(n is None or n > limit for n in smaller), (kernel, b, d, dtype, arch, stages)
                        else:
                            assert all(n is not None and n <= need for n in smaller), (kernel, b, d, dtype, arch)


def test_the_plan_fits_the_gpu_or_falls_back_with_the_numbers():
    small = shared_memory.launch_plan(64, 64, "bf16", 90, H100)
    assert small.options == {k: {"num_warps": 4, "num_stages": 2} for k in shared_memory.KERNELS}
    huge = shared_memory.launch_plan(128, 256, "fp32", 90, H100)
    assert huge.options is None and "bytes of shared memory at num_stages=1; this GPU allows 232,448" in huge.reason
    # every plan's kernels fit its limit; a smaller GPU never gets deeper pipelining than a larger one
    for b in BLOCK_SIZES:
        for d in TRITON_HEAD_DIMS:
            for dtype in shared_memory.DTYPES:
                for arch, limits in ((80, (A100, A10)), (90, (H100,))):
                    for limit in limits:
                        plan = shared_memory.launch_plan(b, d, dtype, arch, limit)
                        for kernel, opts in (plan.options or {}).items():
                            need = TABLE[shared_memory.key(kernel, b, d, dtype, arch, opts["num_stages"])]
                            assert need <= limit
                    big, little = (shared_memory.launch_plan(b, d, dtype, 80, lim) for lim in (A100, A10))
                    assert little.options is None or big.options is not None


def test_a_shape_that_does_not_fit_runs_the_gather_path_said_once(monkeypatch):
    props = SimpleNamespace(name="NVIDIA A10", major=8, minor=6, shared_memory_per_block_optin=A10)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    monkeypatch.setattr(block_sparse, "_PLANS", {})
    device = torch.device("cuda", 0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fits = block_sparse.launch_plan(device, 32, 64, torch.bfloat16)
        too_big = [block_sparse.launch_plan(device, 128, 256, torch.bfloat16) for _ in range(3)]
    assert fits.options is not None and too_big[0].options is None
    said = [str(w.message) for w in caught]
    assert len(said) == 1 and "(NVIDIA A10): block-sparse attention runs the block-gather path" in said[0]
    assert "this GPU allows 101,376" in said[0]


@pytest.mark.parametrize("head_dim", [64, 128])
def test_the_interpreter_runs_the_kernels_with_a_plans_options(head_dim):
    """Options per kernel reach the launches (the CPU interpreter ignores warps and stages, not their names)."""
    from gorilla_dist.kernels import layouts
    from gorilla_dist.kernels.block_sparse import block_sparse_reference, triton_block_sparse_attention

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.fail("the unit tests run the Triton kernels under TRITON_INTERPRET=1 (tests/conftest.py)")
    lay = layouts.sliding(32, 16, window=2)
    q, k, v = (torch.randn(1, 1, 32, head_dim, generator=torch.Generator().manual_seed(i)) for i in range(3))
    options = {kernel: {"num_warps": 4, "num_stages": 1} for kernel in shared_memory.KERNELS}
    got = triton_block_sparse_attention(q, k, v, lay, options=options)
    torch.testing.assert_close(got, block_sparse_reference(q, k, v, lay), rtol=1e-4, atol=1e-4)
