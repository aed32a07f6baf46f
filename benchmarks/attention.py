"""Block-sparse attention speed: forward + backward against dense causal attention, measured in one run.

    python benchmarks/attention.py [--seqs 1024 2048 4096 8192 16384] [--density 0.1] [--reps 3]

CPU (always): our block-gather path (kernels/block_gather.py) vs. `scaled_dot_product_attention(
is_causal=True)`, fp32, batch 1, 8 heads, head dim 64, block 64. The layout keeps ~`density` of the
causal blocks, chosen as the learned layout chooses them (top-k of per-head random scores, own block
always kept), so the kept blocks are scattered, not a convenient band. Target at 8192 / 10%: >= 4x.

GPU (when CUDA is present): the Triton kernel (kernels/block_sparse.py) vs. flash-attn (or SDPA's
flash backend) in bf16, batch 4, 16 heads, head dim 64 and 128, reported as TFLOP/s per kept block
(matmul FLOPs of the blocks actually computed, backward = 2.5x forward) so sparse and dense rates are
comparable. Target: >= 0.8x of flash-attn's dense causal rate.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from gorilla_dist.kernels import layouts as L
from gorilla_dist.kernels.block_gather import block_gather_attention

BLOCK = 64


def layout_with_density(seq: int, heads: int, density: float, device) -> L.BlockLayout:
    n = seq // BLOCK
    causal = n * (n + 1) / 2
    k = min(range(1, n + 1), key=lambda k: abs(sum(min(m + 1, k) for m in range(n)) / causal - density))
    scores = torch.rand(1, heads, n, n, generator=torch.Generator().manual_seed(0))
    num, idx = L.topk(scores, k, keep_first=False)
    return L.BlockLayout(num, idx, BLOCK).to(device)


def timed(fn, reps: int, sync=lambda: None) -> float:
    """Best of `reps` wall times (after one warm-up) of fn() and its backward, in seconds."""
    best = float("inf")
    for i in range(reps + 1):
        sync()
        start = time.perf_counter()
        fn().sum().backward()
        sync()
        if i:
            best = min(best, time.perf_counter() - start)
    return best


def cpu(seqs, density, reps, heads=8, dim=64) -> None:
    print(f"CPU, {torch.get_num_threads()} threads, fp32, batch 1, {heads} heads, head dim {dim}, block {BLOCK}, "
          f"~{density:.0%} of causal blocks kept; forward+backward, best of {reps}")
    print(f"{'seq':>6}{'kept':>8}{'SDPA causal ms':>16}{'block-gather ms':>17}{'speed-up':>10}{'ms per 1k blocks':>18}")
    for seq in seqs:
        lay = layout_with_density(seq, heads, density, "cpu")
        q, k, v = (torch.randn(1, heads, seq, dim, requires_grad=True) for _ in range(3))
        dense = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), reps)
        sparse = timed(lambda: block_gather_attention(q, k, v, lay, scale=dim ** -0.5), reps)
        blocks = int(lay.kv_num_blocks.sum())
        print(f"{seq:>6}{lay.density():>8.1%}{dense * 1e3:>16.1f}{sparse * 1e3:>17.1f}{dense / sparse:>9.2f}x"
              f"{sparse * 1e3 / (blocks / 1000):>18.2f}", flush=True)


def gpu(seqs, density, reps, heads=16, batch=4) -> None:
    from gorilla_dist.kernels.block_sparse import triton_block_sparse_attention

    try:
        from flash_attn import flash_attn_func
    except ImportError:
        flash_attn_func = None
    sync = torch.cuda.synchronize
    name = "flash-attn" if flash_attn_func else "SDPA (flash backend)"
    print(f"\nGPU {torch.cuda.get_device_name()}, bf16, batch {batch}, {heads} heads, block {BLOCK}; "
          f"TFLOP/s over the blocks computed (fwd+bwd = 3.5x fwd matmul FLOPs)")
    print(f"{'dim':>4}{'seq':>7}{'kept':>7}{name + ' TF/s':>26}{'triton TF/s':>13}{'ratio':>8}{'dense ms':>10}"
          f"{'sparse ms':>11}")
    for dim in (64, 128):
        for seq in seqs:
            lay = layout_with_density(seq, heads, density, "cuda")
            q, k, v = (torch.randn(batch, heads, seq, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                       for _ in range(3))
            if flash_attn_func:
                qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
                dense = timed(lambda: flash_attn_func(qt, kt, vt, causal=True), reps, sync)
            else:
                dense = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), reps, sync)
            sparse = timed(lambda: triton_block_sparse_attention(q, k, v, lay), reps, sync)
            per_block = 4 * BLOCK * BLOCK * dim * batch * 3.5  # fwd: QK^T and PV per (query, key) block pair
            dense_blocks = heads * (seq // BLOCK) * (seq // BLOCK + 1) / 2
            sparse_blocks = int(lay.kv_num_blocks.sum())  # per batch element (the layout is shared)
            dense_tf = per_block * dense_blocks / dense / 1e12
            sparse_tf = per_block * sparse_blocks / sparse / 1e12
            print(f"{dim:>4}{seq:>7}{lay.density():>7.1%}{dense_tf:>26.1f}{sparse_tf:>13.1f}"
                  f"{sparse_tf / dense_tf:>7.2f}x{dense * 1e3:>10.2f}{sparse * 1e3:>11.2f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", type=int, nargs="*", default=[1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--gpu-only", action="store_true")
    args = ap.parse_args()
    if not args.gpu_only:
        cpu(args.seqs, args.density, args.reps)
    if torch.cuda.is_available():
        gpu(args.seqs, args.density, args.reps)
    else:
        print("\nGPU: none here (no CUDA); the Triton kernel's speed is measured only on a GPU.")


if __name__ == "__main__":
    main()
