"""Block-sparse attention speed: forward + backward against dense causal attention, measured in one run.

    python benchmarks/attention.py [--seqs 1024 2048 4096 8192 16384] [--density 0.1] [--reps 3]
                                   [--kinds fixed strided proportional]

CPU (always): our block-gather path (gorilla_dist/kernels/block_gather.py) vs. `scaled_dot_product_attention(
is_causal=True)`, fp32, batch 1, 8 heads, head dim 64, block 64. Each layout kind keeps ~`density` of the
causal blocks:
  fixed         the learned layout's shape: the top k of per-head random scores (own block always kept),
                so every row keeps the same k (fewer in the first k rows); scattered, not a band;
  strided       Sparse Transformer's "fixed" pattern (layouts.strided), the stride nearest the density:
                a row's own chunk grows with its position inside it, the summary columns with the row;
  proportional  each row keeps the same fraction of its own past (random choice, own block kept), so
                rows grow linearly from 1 block to density * n: the last rows are ~2x the mean.
Columns: the longest row, wall times, the speed-up, ms per 1,000 kept blocks (equal across kinds when the
cost follows the kept blocks, not the longest row) and GFLOP/s of useful work (the matmul FLOPs of the
kept blocks, forward + backward = 3.5x forward; SDPA's over the causal blocks).
Targets at 8192 / 10%: >= 8x SDPA for every kind; ms per 1k kept blocks within 1.2x across kinds.

GPU (when CUDA is present): the Triton kernel (gorilla_dist/kernels/block_sparse.py) vs. flash-attn (or SDPA's
flash backend) in bf16, batch 4, 16 heads, head dim 64 and 128, reported as TFLOP/s per kept block
(matmul FLOPs of the blocks actually computed, backward = 2.5x forward) so sparse and dense rates are
comparable. Target: >= 0.8x of flash-attn's dense causal rate. The Triton grid is one program per
(query block, batch x head), each looping over its own row's count: no padded tile is computed, and a
ragged layout costs only the imbalance between programs (the longest row sets the tail of the launch).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from gorilla_dist.kernels import layouts as L
from gorilla_dist.kernels.block_gather import block_gather_attention

BLOCK = 64


KINDS = ("fixed", "strided", "proportional")


def layout_with_density(seq: int, heads: int, density: float, device, kind: str = "fixed") -> L.BlockLayout:
    """A layout keeping ~density of the causal blocks, shaped by `kind` (see the module docstring)."""
    n = seq // BLOCK
    causal = n * (n + 1) / 2
    if kind == "strided":
        stride = min(range(1, n + 1), key=lambda s: abs(L.strided(seq, BLOCK, stride=s).density() - density))
        return L.strided(seq, BLOCK, stride=stride).to(device)
    scores = torch.rand(1, heads, n, n, generator=torch.Generator().manual_seed(0))
    if kind == "fixed":
        k = min(range(1, n + 1), key=lambda k: abs(sum(min(m + 1, k) for m in range(n)) / causal - density))
        num, idx = L.topk(scores, k, keep_first=False)
        return L.BlockLayout(num, idx, BLOCK).to(device)
    if kind != "proportional":
        raise ValueError(f"layout kind {kind!r}: expected one of {', '.join(KINDS)}")
    m = torch.arange(n)
    keep = (density * (m + 1)).ceil().clamp_min(1)  # per row, a fraction of its past
    scores = scores.masked_fill(m[None, :] > m[:, None], -1.0).masked_fill(torch.eye(n, dtype=torch.bool), 2.0)
    rank = scores.argsort(-1, descending=True).argsort(-1)
    return L.from_block_mask(rank < keep[:, None], BLOCK).to(device)


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


def cpu(seqs, density, reps, kinds, heads=8, dim=64) -> None:
    print(f"CPU, {torch.get_num_threads()} threads, fp32, batch 1, {heads} heads, head dim {dim}, block {BLOCK}, "
          f"~{density:.0%} of causal blocks kept; forward+backward, best of {reps}")
    print(f"{'kind':>13}{'seq':>6}{'kept':>7}{'max row':>8}{'SDPA ms':>10}{'sparse ms':>11}{'speed-up':>9}"
          f"{'ms/1k blocks':>13}{'SDPA ms/1k':>11}{'GFLOP/s':>9}{'SDPA GF/s':>10}")
    flop = 4 * BLOCK * BLOCK * dim * 3.5  # per (query block, key block) tile, forward + backward
    for seq in seqs:
        q, k, v = (torch.randn(1, heads, seq, dim, requires_grad=True) for _ in range(3))
        dense = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), reps)
        n = seq // BLOCK
        causal_blocks = heads * n * (n + 1) / 2
        for kind in kinds:
            lay = layout_with_density(seq, heads, density, "cpu", kind)
            sparse = timed(lambda: block_gather_attention(q, k, v, lay, scale=dim ** -0.5), reps)
            blocks = int(lay.kv_num_blocks.expand(1, heads, n).sum())
            print(f"{kind:>13}{seq:>6}{lay.density():>7.1%}{int(lay.kv_num_blocks.max()):>8}{dense * 1e3:>10.1f}"
                  f"{sparse * 1e3:>11.1f}{dense / sparse:>8.2f}x{sparse * 1e6 / blocks:>13.2f}"
                  f"{dense * 1e6 / causal_blocks:>11.2f}{flop * blocks / sparse / 1e9:>9.1f}"
                  f"{flop * causal_blocks / dense / 1e9:>10.1f}", flush=True)


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
    ap.add_argument("--kinds", nargs="*", default=list(KINDS), choices=KINDS)
    ap.add_argument("--gpu-only", action="store_true")
    args = ap.parse_args()
    if not args.gpu_only:
        cpu(args.seqs, args.density, args.reps, args.kinds)
    if torch.cuda.is_available():
        gpu(args.seqs, args.density, args.reps)
    else:
        print("\nGPU: none here (no CUDA); the Triton kernel's speed is measured only on a GPU.")


if __name__ == "__main__":
    main()
