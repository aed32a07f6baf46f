"""The GPU-marked tests: the only tests that use CUDA (everything else pins the CPU, so the suite passes on a
CUDA machine too). They run where torch sees a GPU and are skipped, with that reason, elsewhere:

    pytest -m gpu -n 0 tests/            # on a GPU machine (benchmarks/gpu_check.py runs them first)

Tolerances on the GPU: flash-attn's and Triton's backward kernels accumulate in a different order than the CPU
paths (and flash-attn's dK/dV use atomics: not bitwise deterministic), TF32 rounds fp32 matmul inputs to 10
bits, so GPU-vs-CPU comparisons use 2e-2 (bf16/fp16 inputs) or 1e-3 (fp32, TF32 off) relative tolerances.
"""

import json

import pytest
import torch

from gorilla_dist.kernels import block_sparse, layouts
from gorilla_dist.kernels.block_sparse import block_sparse_attention, block_sparse_reference
from helpers import assert_no_host_syncs, check, launch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (pytest -m gpu on one)")]
CUDA = ["parallel.device=cuda"]


SHAPES = [(16, 64), (64, 64), (64, 128), (128, 256)]
"""(block size, head dim): small to the largest kernels/limits.py allows (128 x 256 falls back to the block-gather
path on an A100 and an H100); benchmarks/gpu_check.py launches the tightest fits. Kept few: every Triton shape
compiles at its first launch, and fp32 ones at block 128 take minutes."""


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_every_planned_shape_launches_and_matches_the_reference(dtype):
    """The shared-memory plan (kernels/shared_memory.py) on this GPU: Triton at the planned pipelining depth,
    or the block-gather path where the tiles do not fit; never "out of resource"."""
    torch.backends.cuda.matmul.allow_tf32 = False
    tol = 1e-3 if dtype == torch.float32 else 2e-2
    failed = {}
    for block, head_dim in SHAPES:
        seq = 4 * block
        lay = layouts.sliding(seq, block, window=2).to("cuda")
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(2, 2, seq, head_dim, device="cuda", dtype=dtype, generator=g).requires_grad_()
                   for _ in range(3))
        plan = block_sparse.launch_plan(q.device, block, head_dim, dtype)
        try:
            out = block_sparse_attention(q, k, v, lay)
            out.float().square().sum().backward()
            qr, kr, vr = (t.detach().float().requires_grad_() for t in (q, k, v))
            want = block_sparse_reference(qr, kr, vr, lay)
            want.square().sum().backward()
            torch.testing.assert_close(out.float(), want, rtol=tol, atol=tol)
            torch.testing.assert_close(q.grad.float(), qr.grad, rtol=tol * 5, atol=tol * 5)
        except Exception as err:  # noqa: BLE001 - every shape is tried; the failures are listed together
            failed[(block, head_dim, plan.options is not None)] = f"{type(err).__name__}: {str(err)[:200]}"
    assert not failed, failed


def test_flash_attn_matches_sdpa():
    pytest.importorskip("flash_attn", reason="the optional gpu extra (pip install -e '.[gpu]')")
    from types import SimpleNamespace

    from megatron.core.transformer.enums import AttnMaskType

    from gorilla_dist.kernels import dense

    config = SimpleNamespace(attention_dropout=0.0, kv_channels=64, num_attention_heads=8)
    attn = dense.DenseAttention(config, 1, AttnMaskType.causal, "self").eval()
    q, k, v = (torch.randn(256, 2, 8, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    flash = attn(q, k, v, None)
    sdpa = attn(q, k, v, torch.zeros(2, 256, dtype=torch.int32, device="cuda"))  # segment ids: the SDPA path
    torch.testing.assert_close(flash.float(), sdpa.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_training_run_on_the_gpu_reads_nothing_back_between_log_intervals(tmp_path, precision):
    check(launch(tmp_path / "run", *CUDA, f"precision={precision}", "train.max_steps=20", "logging.count_syncs=true"))
    assert_no_host_syncs(tmp_path / "run", min_steps=10)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["finished"] and summary["final_loss"] < 5


def test_a_cpu_checkpoint_resumes_on_the_gpu(tmp_path):
    run = tmp_path / "run"
    check(launch(run, "train.max_steps=10", "checkpoint.interval=10"))
    out = check(launch(run, *CUDA, "train.max_steps=20", "checkpoint.interval=10"))
    assert "its random-number states are not" in out  # the CPU generator state is not restored on CUDA


def test_batches_reach_the_gpu_without_a_blocking_copy():
    """data.loader.Batch.to pins the host tensors, so the copies are asynchronous (engine/syncs.py counts a
    non_blocking copy from pageable memory as the blocking copy it is)."""
    from gorilla_dist.engine.syncs import SyncCounter
    from test_nonfinite import batch

    b = batch(0)
    with SyncCounter() as syncs:
        on_gpu = b.to(torch.device("cuda"))
    assert syncs.total == 0, syncs.report()
    assert on_gpu.tokens.is_cuda and torch.equal(on_gpu.tokens.cpu(), b.tokens)
