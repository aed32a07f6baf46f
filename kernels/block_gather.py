"""Block-sparse attention for CPU tensors (and any device without Triton): gather, then dense math.

Each (batch, head, query block) is one unit of work. For a unit, gather the key/value blocks its
layout lists into one contiguous (max_kv * block) strip and run softmax attention against that
strip with batched matmuls. Units are processed in chunks of a few MB so the strips and scores stay
in cache (on 2 CPU cores this alone doubles the matmul rate over one big batch). Like
FlashAttention-2 the forward keeps only the output and the row log-sum-exp; the backward
recomputes the scores chunk by chunk and scatter-adds the strip gradients into dK/dV with
`index_add_`. Work and memory grow with the kept blocks, n_blocks * max_kv * block^2, not with S^2.
FlexAttention cannot serve here: in our torch it has no backward on CPU (../STACK_NOTES).

Same arguments and semantics as the Triton kernel (gorilla_dist.kernels.block_sparse), which the
tests compare both against: causal inside the diagonal block, optional ALiBi slopes, optional
per-(query block, slot) additive bias (the learned layout's gate), grouped-query attention, and
optional per-token segment ids (documents, prefix-LM inputs) that mask every tile token by token.
"""

from __future__ import annotations

import torch

from gorilla_dist.kernels.layouts import BlockLayout, check_qkv
from gorilla_dist.kernels.limits import BIDIRECTIONAL

CHUNK_BYTES = 4 << 20
"""Target size of one chunk's score tile (fp32): small enough for cache, large enough for BLAS."""
MASKED = -1.0e30
"""Added to scores above the diagonal: finite, so that 0 * MASKED stays 0 in the broadcast add."""


class _Units:
    """Per-unit metadata, flattened over (batch, head, query block): gather rows, tile terms."""

    def __init__(self, layout: BlockLayout, B: int, H: int, H_kv: int, device, alibi_slopes, block_bias,
                 segments=None):
        bs, n, kmax = layout.block_size, layout.n_blocks, layout.max_kv
        idx = layout.kv_indices.to(device).long().expand(B, H, n, kmax)
        m = torch.arange(n, device=device)[:, None]
        valid = layout.valid_slots().to(device).expand(B, H, n, kmax)
        head = torch.arange(B, device=device)[:, None] * H_kv + torch.arange(H, device=device) // (H // H_kv)
        self.rows = (head[:, :, None, None] * n + idx).reshape(-1, kmax)  # rows of k viewed (B*H_kv*n, bs, D)
        self.diag = ((idx == m) & valid).float().reshape(-1, 1, kmax, 1)
        # one additive term per (unit, slot): padding, ALiBi's block offset, the tile bias
        tile = torch.zeros(B, H, n, kmax, device=device).masked_fill_(~valid, float("-inf"))
        self.slope = self.seg = None
        if segments is not None:  # per token: ids and positions of each unit's queries and key strip
            seg = segments.to(device).view(B * n, bs)
            bid = seg >= BIDIRECTIONAL
            self.seg = (torch.where(bid, seg - BIDIRECTIONAL, seg), bid, seg < 0)  # doc, seen ahead, seen by all docs
            blocks = torch.arange(B, device=device)[:, None, None] * n
            self.qrow = (blocks + torch.arange(n, device=device)).expand(B, H, n).reshape(-1)
            self.krow = (blocks[..., None] + idx).reshape(-1, kmax)
            self.pos = torch.arange(B * n, device=device).remainder(n).view(-1, 1) * bs + torch.arange(bs, device=device)
        if alibi_slopes is not None and segments is not None:
            self.slope = (-alibi_slopes.float().to(device).view(1, H, 1, 1)).expand(B, H, n, 1).reshape(-1, 1, 1)
        elif alibi_slopes is not None:
            slope = alibi_slopes.float().to(device).view(1, H, 1, 1)
            tile -= slope * ((m - idx) * bs).float()
            self.slope = (-slope).expand(B, H, n, 1).reshape(-1, 1, 1, 1)
        if block_bias is not None:
            tile += block_bias.detach().float()
        self.tile = tile.reshape(-1, 1, kmax, 1)
        pos = torch.arange(bs, device=device, dtype=torch.float32)
        self.offset = (pos[:, None] - pos[None, :]).view(1, bs, 1, bs)  # query - key inside a tile
        self.causal = torch.where(self.offset < 0, MASKED, 0.0)
        self.count, self.kmax, self.bs = B * H * n, kmax, bs
        self.chunk = max(1, CHUNK_BYTES // (bs * kmax * bs * 4))

    def scores(self, qc, kc, lo, hi, scale):
        """(c, bs, kmax*bs) fp32 masked scores of units [lo, hi)."""
        s = torch.bmm(qc, kc.transpose(1, 2)).float().mul_(scale)
        s4 = s.view(hi - lo, self.bs, self.kmax, self.bs)
        s4.add_(self.tile[lo:hi])
        if self.seg is not None:
            return self._segment_scores(s, lo, hi)
        s4.addcmul_(self.diag[lo:hi], self.causal)
        if self.slope is not None:
            s4.addcmul_(self.slope[lo:hi], self.offset)
        return s

    def _segment_scores(self, s, lo, hi):
        """Token by token (segment ids given): inside the query's document (or a shared id < 0), causal
        except toward input tokens (dense.sdpa_keep_mask's rule); ALiBi on the distance either way."""
        doc, ahead, shared = self.seg
        qr, kr = self.qrow[lo:hi], self.krow[lo:hi].reshape(-1)
        c = hi - lo
        pq, pk = self.pos[qr][:, :, None], self.pos[kr].view(c, 1, -1)
        keep = (doc[qr][:, :, None] == doc[kr].view(c, 1, -1)) | shared[kr].view(c, 1, -1)
        keep &= (pk <= pq) | ahead[kr].view(c, 1, -1)
        s.masked_fill_(~keep, MASKED)
        if self.slope is not None:
            s.addcmul_(self.slope[lo:hi], (pq - pk).abs().float())
        return s

    def gather(self, t: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        bs, D = self.bs, t.shape[-1]
        return t.view(-1, bs, D).index_select(0, self.rows[lo:hi].reshape(-1)).view(hi - lo, self.kmax * bs, D)


class BlockGatherAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, block_bias, layout: BlockLayout, scale: float, alibi_slopes, segments):
        B, H, S, D = q.shape
        u = _Units(layout, B, H, k.shape[1], q.device, alibi_slopes, block_bias, segments)
        bs = layout.block_size
        qu = q.view(-1, bs, D)
        out = torch.empty_like(q)
        ou = out.view(-1, bs, D)
        lse = torch.empty(u.count, bs, 1, device=q.device)
        for lo in range(0, u.count, u.chunk):
            hi = min(lo + u.chunk, u.count)
            s = u.scores(qu[lo:hi], u.gather(k, lo, hi), lo, hi, scale)
            mx = s.amax(-1, keepdim=True)
            s.sub_(mx).exp_()
            total = s.sum(-1, keepdim=True)
            s.div_(total)
            lse[lo:hi] = mx + total.log()
            torch.bmm(s.to(v.dtype), u.gather(v, lo, hi), out=ou[lo:hi])
        ctx.save_for_backward(q, k, v, out, lse, block_bias)
        ctx.units, ctx.scale = u, scale
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse, block_bias = ctx.saved_tensors
        u, scale = ctx.units, ctx.scale
        bs, D = u.bs, q.shape[-1]
        do = do.contiguous()
        qu, dou = q.view(-1, bs, D), do.view(-1, bs, D)
        delta = (do.float() * out.float()).sum(-1).view(-1, bs, 1)  # rowsum(P * dP)
        dq = torch.empty_like(q)
        dqu = dq.view(-1, bs, D)
        dk, dv = torch.zeros_like(k), torch.zeros_like(v)
        dtile = torch.empty(u.count, u.kmax, device=q.device) if block_bias is not None else None
        for lo in range(0, u.count, u.chunk):
            hi = min(lo + u.chunk, u.count)
            kc, vc = u.gather(k, lo, hi), u.gather(v, lo, hi)
            p = u.scores(qu[lo:hi], kc, lo, hi, scale).sub_(lse[lo:hi]).exp_()  # (c, bs, kmax*bs)
            dv.view(-1, bs, D).index_add_(0, u.rows[lo:hi].reshape(-1),
                                          torch.bmm(p.transpose(1, 2).to(q.dtype), dou[lo:hi]).view(-1, bs, D))
            ds = torch.bmm(dou[lo:hi], vc.transpose(1, 2)).float().sub_(delta[lo:hi]).mul_(p)
            if dtile is not None:
                dtile[lo:hi] = ds.view(hi - lo, bs, u.kmax, bs).sum((1, 3))
            ds = ds.mul_(scale).to(q.dtype)
            torch.bmm(ds, kc, out=dqu[lo:hi])
            dk.view(-1, bs, D).index_add_(0, u.rows[lo:hi].reshape(-1),
                                          torch.bmm(ds.transpose(1, 2), qu[lo:hi]).view(-1, bs, D))
        dbias = None
        if block_bias is not None:  # summed over the dimensions a broadcast bias leaves out
            dbias = dtile.view(*q.shape[:2], -1, u.kmax).sum_to_size(block_bias.shape).to(block_bias.dtype)
        return dq, dk, dv, dbias, None, None, None, None


def block_gather_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout, *,
                           scale: float, alibi_slopes: torch.Tensor | None = None,
                           block_bias: torch.Tensor | None = None,
                           segments: torch.Tensor | None = None) -> torch.Tensor:
    """q (B, H, S, D); k, v (B, H_kv, S, D) with H % H_kv == 0; alibi_slopes (H,); block_bias
    (B|1, H|1, n, max_kv) added to every score of that (query block, slot) tile; segments (B, S) int, the
    per-token mask (see layouts.with_segments). Returns (B, H, S, D)."""
    check_qkv(q, k, v, layout, segments)
    q, k, v = (t.contiguous() for t in (q, k, v))
    return BlockGatherAttention.apply(q, k, v, block_bias, layout, scale, alibi_slopes, segments)
