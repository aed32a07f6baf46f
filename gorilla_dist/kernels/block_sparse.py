"""Block-sparse causal attention in Triton: forward and backward over a BlockLayout.

In the order of Triton's fused-attention tutorial (06-fused-attention.py), whose online softmax
and backward recomputation this follows (FlashAttention-2, Dao 2023):
  1. `_fwd_kernel`: one program per (query block, batch*head); it walks only the key blocks its
     layout lists, keeps a running max and sum (online softmax), writes O and the row
     log-sum-exp (LSE) that the backward reuses instead of storing probabilities.
  2. `_bwd_dq_kernel`: the same walk per query block, recomputes P from the LSE, accumulates dQ,
     and writes the gradient of each (query block, slot) tile bias: the sum of dS over the tile.
  3. `_bwd_dkv_kernel`: one program per key block, walking the *transposed* layout (the query
     blocks that visit it), accumulates dK and dV. Both backward kernels own their outputs, so no
     atomics: results are deterministic.
  4. `BlockSparseAttention` (autograd.Function) checks shapes and dtypes and launches them;
     `block_sparse_attention` is the public entry (Triton on CUDA, the block-gather path elsewhere);
     `block_sparse_reference` is the dense PyTorch reference the tests compare against.

Options: causal inside the diagonal block (always), fp32/fp16/bf16 inputs with fp32 accumulation,
head dims 16-256 (powers of two; 64 and 128 are the tested ones), grouped-query attention (query
head h reads key/value head h // (H / H_kv)), ALiBi slopes, and a per-(query block, slot) additive
bias (the learned layout's gate). The triton interpreter (TRITON_INTERPRET=1) runs these on CPU
for tests; its bf16 `tl.dot` is wrong, so under the interpreter bf16 operands are upcast first.
"""

from __future__ import annotations

import math
import os
import warnings

import torch

from gorilla_dist.kernels import shared_memory
from gorilla_dist.kernels.dense import attention_reference, sdpa_keep_mask
from gorilla_dist.kernels.layouts import BlockLayout, bias_by_block, check_qkv
from gorilla_dist.kernels.limits import BIDIRECTIONAL, TRITON_HEAD_DIMS

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with torch on Linux
    triton = None


if triton is not None:
    _BIDIRECTIONAL = tl.constexpr(BIDIRECTIONAL)  # (a kernel reads globals only as constexpr)

    @triton.jit
    def _dot(a, b, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
        if UPCAST:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PRECISION)
        return tl.dot(a, b, input_precision=PRECISION)

    @triton.jit
    def _scores(q, k, offs_m, offs_k, scale, slope, bias, SEG, seg_b, HAS_ALIBI: tl.constexpr,
                HAS_BIAS: tl.constexpr, HAS_SEG: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
        """(BLOCK, BLOCK) fp32 scores of one tile, masked with -inf: causally, or with segment ids by
        dense.sdpa_keep_mask's rule (same document or a shared id < 0; causal except toward input tokens)."""
        s = _dot(q, tl.trans(k), UPCAST, PRECISION) * scale
        if HAS_ALIBI:  # distance either way (only prefix-LM inputs lie ahead)
            s -= slope * tl.abs(offs_m[:, None] - offs_k[None, :]).to(tl.float32)
        if HAS_BIAS:
            s += bias
        keep = offs_k[None, :] <= offs_m[:, None]
        if HAS_SEG:
            sq = tl.load(SEG + seg_b + offs_m)
            sk = tl.load(SEG + seg_b + offs_k)
            bid_k = sk >= _BIDIRECTIONAL
            doc_q = tl.where(sq >= _BIDIRECTIONAL, sq - _BIDIRECTIONAL, sq)
            doc_k = tl.where(bid_k, sk - _BIDIRECTIONAL, sk)
            keep = (keep | bid_k[None, :]) & ((doc_q[:, None] == doc_k[None, :]) | (sk[None, :] < 0))
        return tl.where(keep, s, float("-inf"))

    @triton.jit
    def _fwd_kernel(Q, K, V, O, LSE, NUM, IDX, SLOPES, BIAS, SEG,
                    sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sob, soh, sos,
                    snb, snh, snm, sib, sih, sim, sbb, sbh, sbm, ssb,
                    H, GROUP, n_blocks, scale,
                    BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_ALIBI: tl.constexpr,
                    HAS_BIAS: tl.constexpr, HAS_SEG: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
        m = tl.program_id(0)
        bh = tl.program_id(1)
        b, h = bh // H, bh % H
        hk = h // GROUP
        offs_m = m * BLOCK + tl.arange(0, BLOCK)
        offs_n = tl.arange(0, BLOCK)
        offs_d = tl.arange(0, HEAD_DIM)
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :])
        num = tl.load(NUM + b * snb + h * snh + m * snm)
        slope = tl.load(SLOPES + h) if HAS_ALIBI else 0.0
        # finite start: a fully masked tile then gives p = 0 instead of exp(-inf + inf) = nan
        m_i = tl.full([BLOCK], -1.0e30, tl.float32)
        l_i = tl.zeros([BLOCK], tl.float32)
        acc = tl.zeros([BLOCK, HEAD_DIM], tl.float32)
        for s in range(0, num):
            j = tl.load(IDX + b * sib + h * sih + m * sim + s)
            offs_k = j * BLOCK + offs_n
            k = tl.load(K + b * skb + hk * skh + offs_k[:, None] * sks + offs_d[None, :])
            v = tl.load(V + b * svb + hk * svh + offs_k[:, None] * svs + offs_d[None, :])
            bias = tl.load(BIAS + b * sbb + h * sbh + m * sbm + s) if HAS_BIAS else 0.0
            qk = _scores(q, k, offs_m, offs_k, scale, slope, bias, SEG, b * ssb, HAS_ALIBI, HAS_BIAS, HAS_SEG,
                         UPCAST, PRECISION)
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            p = tl.exp(qk - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST, PRECISION)
            m_i = m_new
        acc = acc / l_i[:, None]
        tl.store(O + b * sob + h * soh + offs_m[:, None] * sos + offs_d[None, :], acc.to(O.dtype.element_ty))
        tl.store(LSE + bh * n_blocks * BLOCK + offs_m, m_i + tl.log(l_i))

    @triton.jit
    def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, DBIAS, NUM, IDX, SLOPES, BIAS, SEG,
                       sqb, sqh, sqs, skb, skh, sks, svb, svh, svs,
                       snb, snh, snm, sib, sih, sim, sbb, sbh, sbm, ssb, max_kv,
                       H, GROUP, n_blocks, scale,
                       BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_ALIBI: tl.constexpr,
                       HAS_BIAS: tl.constexpr, HAS_SEG: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
        m = tl.program_id(0)
        bh = tl.program_id(1)
        b, h = bh // H, bh % H
        hk = h // GROUP
        offs_m = m * BLOCK + tl.arange(0, BLOCK)
        offs_n = tl.arange(0, BLOCK)
        offs_d = tl.arange(0, HEAD_DIM)
        q_off = b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :]  # Q, DO and DQ share strides
        q = tl.load(Q + q_off)
        do = tl.load(DO + q_off)
        lse = tl.load(LSE + bh * n_blocks * BLOCK + offs_m)
        delta = tl.load(DELTA + bh * n_blocks * BLOCK + offs_m)
        num = tl.load(NUM + b * snb + h * snh + m * snm)
        slope = tl.load(SLOPES + h) if HAS_ALIBI else 0.0
        dq = tl.zeros([BLOCK, HEAD_DIM], tl.float32)
        for s in range(0, num):
            j = tl.load(IDX + b * sib + h * sih + m * sim + s)
            offs_k = j * BLOCK + offs_n
            k = tl.load(K + b * skb + hk * skh + offs_k[:, None] * sks + offs_d[None, :])
            v = tl.load(V + b * svb + hk * svh + offs_k[:, None] * svs + offs_d[None, :])
            bias = tl.load(BIAS + b * sbb + h * sbh + m * sbm + s) if HAS_BIAS else 0.0
            qk = _scores(q, k, offs_m, offs_k, scale, slope, bias, SEG, b * ssb, HAS_ALIBI, HAS_BIAS, HAS_SEG,
                         UPCAST, PRECISION)
            p = tl.exp(qk - lse[:, None])
            dp = _dot(do, tl.trans(v), UPCAST, PRECISION)
            ds = p * (dp - delta[:, None])
            if HAS_BIAS:
                tl.store(DBIAS + (bh * n_blocks + m) * max_kv + s, tl.sum(tl.sum(ds, 1), 0))
            dq += _dot(ds.to(k.dtype), k, UPCAST, PRECISION)
        tl.store(DQ + q_off, (dq * scale).to(DQ.dtype.element_ty))

    @triton.jit
    def _bwd_dkv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, QNUM, QIDX, QSLOT, SLOPES, BIAS, SEG,
                        sqb, sqh, sqs, skb, skh, sks, svb, svh, svs,
                        stb, sth, stj, sbb, sbh, sbm, ssb,
                        H, GROUP, n_blocks, max_q, scale,
                        BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_ALIBI: tl.constexpr,
                        HAS_BIAS: tl.constexpr, HAS_SEG: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
        j = tl.program_id(0)
        bh = tl.program_id(1)
        b, h = bh // H, bh % H
        hk = h // GROUP
        offs_k = j * BLOCK + tl.arange(0, BLOCK)
        offs_n = tl.arange(0, BLOCK)
        offs_d = tl.arange(0, HEAD_DIM)
        k = tl.load(K + b * skb + hk * skh + offs_k[:, None] * sks + offs_d[None, :])
        v = tl.load(V + b * svb + hk * svh + offs_k[:, None] * svs + offs_d[None, :])
        t_off = b * stb + h * sth + j * stj
        num = tl.load(QNUM + t_off)
        slope = tl.load(SLOPES + h) if HAS_ALIBI else 0.0
        dk = tl.zeros([BLOCK, HEAD_DIM], tl.float32)
        dv = tl.zeros([BLOCK, HEAD_DIM], tl.float32)
        for t in range(0, num):
            m = tl.load(QIDX + t_off * max_q + t)
            offs_m = m * BLOCK + offs_n
            q_off = b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :]
            q = tl.load(Q + q_off)
            do = tl.load(DO + q_off)
            lse = tl.load(LSE + bh * n_blocks * BLOCK + offs_m)
            delta = tl.load(DELTA + bh * n_blocks * BLOCK + offs_m)
            if HAS_BIAS:
                bias = tl.load(BIAS + b * sbb + h * sbh + m * sbm + tl.load(QSLOT + t_off * max_q + t))
            else:
                bias = 0.0
            qk = _scores(q, k, offs_m, offs_k, scale, slope, bias, SEG, b * ssb, HAS_ALIBI, HAS_BIAS, HAS_SEG,
                         UPCAST, PRECISION)
            p = tl.exp(qk - lse[:, None])
            dv += _dot(tl.trans(p.to(do.dtype)), do, UPCAST, PRECISION)
            dp = _dot(do, tl.trans(v), UPCAST, PRECISION)
            ds = p * (dp - delta[:, None])
            dk += _dot(tl.trans(ds.to(q.dtype)), q, UPCAST, PRECISION)
        out = bh * n_blocks * BLOCK * HEAD_DIM + offs_k[:, None] * HEAD_DIM + offs_d[None, :]
        tl.store(DK + out, dk * scale)
        tl.store(DV + out, dv)


def _strides(t: torch.Tensor, dims: int = 3):
    """Strides of the leading `dims` dimensions, 0 where the dimension is broadcast (size 1)."""
    return [0 if t.shape[i] == 1 else t.stride(i) for i in range(dims)]


def _upcast(dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"


def _precision() -> str:
    # fp32 inputs: full-precision dots unless the user allowed TF32 for matmuls (as torch does);
    # ignored for fp16/bf16 inputs
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _dtype_name(dtype: torch.dtype) -> str:
    name = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
    return "fp32-tf32" if name == "fp32" and _precision() == "tf32" else name


def _default_options(head_dim: int) -> dict:
    """Launch options where no plan was made (the interpreter): the deepest pipelining."""
    opts = {"num_warps": shared_memory.num_warps(head_dim), "num_stages": shared_memory.STAGES[0]}
    return {kernel: opts for kernel in shared_memory.KERNELS}


_PLANS: dict = {}


def launch_plan(device: torch.device, block: int, head_dim: int, dtype: torch.dtype) -> shared_memory.LaunchPlan:
    """The shipped table's plan for this GPU (shared_memory.launch_plan), once per shape; a plan that falls
    back to the block-gather path says so once."""
    name = _dtype_name(dtype)
    index = device.index if device.index is not None else torch.cuda.current_device()
    cache_key = (index, block, head_dim, name)
    if cache_key not in _PLANS:
        props = torch.cuda.get_device_properties(index)
        limit = getattr(props, "shared_memory_per_block_optin", 0) or shared_memory.SHARED_MEMORY.get(
            props.major * 10 + props.minor, shared_memory.SHARED_MEMORY[80])
        arch = shared_memory.table_arch(props.major, props.minor)
        plan = shared_memory.launch_plan(block, head_dim, name, arch, limit)
        if plan.options is None:
            warnings.warn(f"{plan.reason} ({props.name}): block-sparse attention runs the block-gather path "
                          "instead (same result, slower); a smaller model.sparse.block_size fits", stacklevel=3)
        _PLANS[cache_key] = plan
    return _PLANS[cache_key]


class BlockSparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, block_bias, layout: BlockLayout, scale: float, alibi_slopes, segments, options):
        check_qkv(q, k, v, layout, segments)
        B, H, S, D = q.shape
        bs, n = layout.block_size, layout.n_blocks
        if D not in TRITON_HEAD_DIMS:
            raise ValueError(f"head dim {D}: the Triton kernel takes {', '.join(map(str, TRITON_HEAD_DIMS))}")
        if q.dtype not in (torch.float32, torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
            raise ValueError(f"dtypes q {q.dtype}, k {k.dtype}, v {v.dtype}: expected one of fp32/fp16/bf16 for all")
        q, k, v = (t.contiguous() for t in (q, k, v))
        num, idx = layout.kv_num_blocks, layout.kv_indices.contiguous()
        slopes = alibi_slopes.float().contiguous() if alibi_slopes is not None else q.new_empty(1, dtype=torch.float32)
        bias = block_bias.float().contiguous() if block_bias is not None else q.new_empty(1, 1, 1, dtype=torch.float32)
        o = torch.empty_like(q)
        lse = torch.empty(B, H, S, device=q.device, dtype=torch.float32)
        seg = (segments.to(torch.int32).contiguous() if segments is not None
               else q.new_empty(1, 1, dtype=torch.int32))
        _fwd_kernel[(n, B * H)](
            q, k, v, o, lse, num, idx, slopes, bias, seg,
            *_strides(q), *_strides(k), *_strides(v), *_strides(o),
            *_strides(num), *_strides(idx), *_strides(bias), *_strides(seg, 1),
            H, H // k.shape[1], n, scale,
            BLOCK=bs, HEAD_DIM=D, HAS_ALIBI=alibi_slopes is not None, HAS_BIAS=block_bias is not None,
            HAS_SEG=segments is not None, UPCAST=_upcast(q.dtype), PRECISION=_precision(), **options["fwd"])
        ctx.save_for_backward(q, k, v, o, lse, slopes, bias, seg)
        ctx.has_seg = segments is not None
        ctx.layout, ctx.scale, ctx.options = layout, scale, options
        ctx.has_alibi = alibi_slopes is not None
        ctx.bias_shape = None if block_bias is None else block_bias.shape
        ctx.bias_dtype = None if block_bias is None else block_bias.dtype
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, slopes, bias, seg = ctx.saved_tensors
        layout, scale = ctx.layout, ctx.scale
        B, H, S, D = q.shape
        H_kv, bs, n = k.shape[1], layout.block_size, layout.n_blocks
        has_bias = ctx.bias_shape is not None
        do = do.contiguous()
        delta = (o.float() * do.float()).sum(-1)  # (B, H, S): rowsum(dO * O) = rowsum(P * dP)
        dq = torch.empty_like(q)
        dbias = torch.zeros(B, H, n, layout.max_kv, device=q.device, dtype=torch.float32) if has_bias else bias
        num, idx = layout.kv_num_blocks, layout.kv_indices.contiguous()
        common = dict(BLOCK=bs, HEAD_DIM=D, HAS_ALIBI=ctx.has_alibi, HAS_BIAS=has_bias, HAS_SEG=ctx.has_seg,
                      UPCAST=_upcast(q.dtype), PRECISION=_precision())
        _bwd_dq_kernel[(n, B * H)](
            q, k, v, do, lse, delta, dq, dbias, num, idx, slopes, bias, seg,
            *_strides(q), *_strides(k), *_strides(v), *_strides(num), *_strides(idx), *_strides(bias),
            *_strides(seg, 1), layout.max_kv, H, H // H_kv, n, scale, **common, **ctx.options["bwd_dq"])
        q_num, q_idx, q_slot = layout.transposed  # cached on the layout: once per static layout
        q_num = q_num.contiguous()
        q_idx, q_slot = q_idx.expand(*q_num.shape, -1).contiguous(), q_slot.expand(*q_num.shape, -1).contiguous()
        dk = torch.empty(B, H, S, D, device=q.device, dtype=torch.float32)  # per query head; GQA sums below
        dv = torch.empty_like(dk)
        _bwd_dkv_kernel[(n, B * H)](
            q, k, v, do, lse, delta, dk, dv, q_num, q_idx, q_slot, slopes, bias, seg,
            *_strides(q), *_strides(k), *_strides(v), *_strides(q_num), *_strides(bias), *_strides(seg, 1),
            H, H // H_kv, n, q_idx.shape[-1], scale, **common, **ctx.options["bwd_dkv"])
        dk = dk.view(B, H_kv, H // H_kv, S, D).sum(2).to(k.dtype)
        dv = dv.view(B, H_kv, H // H_kv, S, D).sum(2).to(v.dtype)
        dbias = dbias.sum_to_size(ctx.bias_shape).to(ctx.bias_dtype) if has_bias else None  # a broadcast bias
        return dq, dk, dv, dbias, None, None, None, None, None


def triton_block_sparse_attention(q, k, v, layout: BlockLayout, *, scale: float | None = None,
                                  alibi_slopes: torch.Tensor | None = None, block_bias: torch.Tensor | None = None,
                                  segments: torch.Tensor | None = None, options: dict | None = None) -> torch.Tensor:
    """The Triton kernels; `options` per kernel (a LaunchPlan's), by default the deepest pipelining."""
    if triton is None:
        raise RuntimeError("triton is not installed; use the block-gather path (gorilla_dist.kernels.block_gather)")
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return BlockSparseAttention.apply(q, k, v, block_bias, layout.to(q.device), scale, alibi_slopes, segments,
                                      options or _default_options(q.shape[-1]))


def block_sparse_attention(q, k, v, layout: BlockLayout, *, scale: float | None = None,
                           alibi_slopes: torch.Tensor | None = None, block_bias: torch.Tensor | None = None,
                           segments: torch.Tensor | None = None) -> torch.Tensor:
    """Block-sparse attention, causal or (segments) by segment ids. q (B, H, S, D); k, v (B, H_kv, S, D);
    layout over H query heads (or broadcast); alibi_slopes (H,); block_bias (B|1, H|1, n_blocks,
    layout.max_kv); segments (B, S) int (documents and prefix-LM inputs: dense.sdpa_keep_mask's meaning,
    the layout from layouts.with_segments). Triton on CUDA tensors whose head dim it supports (powers of
    two, 16-256) and whose tiles fit the GPU's shared memory (launch_plan); the block-gather path otherwise
    (any device, any head dim)."""
    d = q.shape[-1]
    if q.is_cuda and triton is not None and d in TRITON_HEAD_DIMS:
        plan = launch_plan(q.device, layout.block_size, d, q.dtype)
        if plan.options is not None:
            return triton_block_sparse_attention(q, k, v, layout, scale=scale, alibi_slopes=alibi_slopes,
                                                 block_bias=block_bias, segments=segments, options=plan.options)
    from gorilla_dist.kernels.block_gather import block_gather_attention

    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    return block_gather_attention(q, k, v, layout.to(q.device), scale=scale, alibi_slopes=alibi_slopes,
                                  block_bias=block_bias, segments=segments)


def block_sparse_reference(q, k, v, layout: BlockLayout, *, scale: float | None = None,
                           alibi_slopes: torch.Tensor | None = None, block_bias: torch.Tensor | None = None,
                           segments: torch.Tensor | None = None) -> torch.Tensor:
    """Dense attention in fp32 (dense.attention_reference) with the layout expanded to a token mask (and
    with segments, dense.sdpa_keep_mask's mask), and ALiBi and the tile bias expanded to token scores:
    what both kernels compute."""
    B, H, S, D = q.shape
    bias = torch.zeros((), device=q.device)
    pos = torch.arange(S, device=q.device)
    if alibi_slopes is not None:
        bias = bias - alibi_slopes.float().view(1, H, 1, 1) * (pos[:, None] - pos[None, :]).abs().float()
    if block_bias is not None:
        full = bias_by_block(layout, block_bias.float())[..., :-1]
        bias = bias + full.repeat_interleave(layout.block_size, -1).repeat_interleave(layout.block_size, -2)
    if segments is None:
        mask = layout.dense_mask()
    else:
        bs = layout.block_size
        blocks = layout.block_mask().repeat_interleave(bs, -1).repeat_interleave(bs, -2)
        mask = blocks & sdpa_keep_mask(segments, S)
    return attention_reference(q, k, v, causal=False, scale=scale, mask=mask, bias=bias)
