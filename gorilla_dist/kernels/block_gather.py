"""Block-sparse attention for CPU tensors (and any device without Triton): gather, then dense math.

Each (batch, head, query block) is one unit of work. A unit gathers the key/value blocks its layout
lists into one contiguous strip and runs softmax attention against it with batched matmuls. Units are
grouped by their exact number of kept blocks k (a causal layout's early rows keep fewer; a strided or
proportional layout's rows grow with position), and each group is cut into chunks of a few MB, so a
chunk is one (c, block, k*block) batched matmul with no padded slot: the work is the kept blocks,
whatever the shape of the lists (`_Units.tiles` counts it). Small chunks keep the strips and scores in
cache (on 2 CPU cores this alone doubles the matmul rate over one big batch).

The softmax is torch's fused one (max, exp, sum and divide in one pass over each row); its backward is
P * (dP - rowsum(P * dP)), the row sum taken from the same P and dP (FlashAttention's rowsum(dO * O) is
the same number mathematically, but its rounding leaves a tile-bias gradient that should be exactly 0,
e.g. a row with one block, at ~1e-5). When a gradient is wanted, the forward
keeps each chunk's probabilities and key/value strips for the backward while they fit in KEEP_BYTES (a
kept block costs block x (4 block + 2 D x element size) bytes: 32 KB at block 64, D 32, fp32), so the
backward runs four matmuls per tile and no softmax, gathers no strip and recomputes no score. Above that,
it keeps nothing but its inputs, like FlashAttention-2, and the backward recomputes the chunk's scores and
softmax. The strip gradients are scatter-added into dK/dV with `index_add_`. Masking is fused where the
structure allows: a causal list ends with its diagonal block, so the causal mask touches only the last
tile of a strip; the per-tile term is added only with ALiBi or a tile bias; the softmax scale multiplies
fp32 queries (block x D) or, in half precision, the fp32 scores; the backward applies it to the block x D
products. FlexAttention cannot serve here: in torch 2.13 its CPU
backward raises NotImplementedError (eager and compiled).

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
KEEP_BYTES = 1 << 30
"""The most the forward keeps for the backward (probabilities + key/value strips, all chunks of one call);
above it the backward recomputes them. 1 GB: ~21k kept blocks at block 64, D 64, fp32 (48 KB each)."""
MASKED = -1.0e30
"""Added to scores above the diagonal: finite, so that 0 * MASKED stays 0 in the broadcast add."""


class _Chunk:
    """Units `ids` (flat (batch, head, query block) indices) that all keep the same k blocks, and the
    per-unit terms they need, sliced once for the forward and the backward."""

    def __init__(self, u: "_Units", ids: torch.Tensor, k: int):
        self.ids, self.k = ids, k
        self.rows = u.rows[ids, :k].reshape(-1)  # rows of k/v viewed (B*H_kv*n, bs, D)
        self.tile = None if u.tile is None else u.tile[ids, :k].view(-1, 1, k, 1)
        self.diag = None if u.diag is None else u.diag[ids, :k].view(-1, 1, k, 1)
        self.slope = None if u.slope is None else u.slope[ids]
        if u.seg is not None:
            self.qrow, self.krow = u.qrow[ids], u.krow[ids, :k]


class _Units:
    """Per-unit metadata, flattened over (batch, head, query block), and the chunks of equal count."""

    def __init__(self, layout: BlockLayout, B: int, H: int, H_kv: int, device, alibi_slopes, block_bias,
                 segments=None):
        bs, n, kmax = layout.block_size, layout.n_blocks, layout.max_kv
        idx = layout.kv_indices.to(device).long().expand(B, H, n, kmax)
        num = layout.kv_num_blocks.to(device).long().expand(B, H, n).reshape(-1)
        if int(num.min()) < 1:
            raise ValueError("block-sparse attention: a query block lists no key block (every layout keeps "
                             "its diagonal block)")
        m = torch.arange(n, device=device)[:, None]
        head = torch.arange(B, device=device)[:, None] * H_kv + torch.arange(H, device=device) // (H // H_kv)
        self.rows = (head[:, :, None, None] * n + idx).reshape(-1, kmax)
        is_diag = (idx == m).reshape(-1, kmax)
        # a causal list is ascending and ends with its diagonal block: then only the last tile needs the mask
        self.diag_last = segments is None and bool(is_diag.gather(1, (num - 1)[:, None]).all())
        self.diag = None if self.diag_last else is_diag.float()
        tile = None  # one additive term per (unit, slot): ALiBi's block offset, the tile bias
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
            tile = (-slope * ((m - idx) * bs).float()).expand(B, H, n, kmax)
            self.slope = (-slope).expand(B, H, n, 1).reshape(-1, 1, 1, 1)
        if block_bias is not None:
            bias = block_bias.detach().float().to(device)
            tile = bias.expand(B, H, n, kmax) if tile is None else tile + bias
        self.tile = None if tile is None else tile.reshape(-1, kmax)
        pos = torch.arange(bs, device=device, dtype=torch.float32)
        self.offset = (pos[:, None] - pos[None, :]).view(1, bs, 1, bs)  # query - key inside a tile
        self.causal = torch.where(self.offset < 0, MASKED, 0.0)
        self.count, self.kmax, self.bs = B * H * n, kmax, bs
        order = torch.argsort(num, stable=True)
        self.chunks, start = [], 0
        for k, c in enumerate(torch.bincount(num).tolist()):
            group, start = order[start:start + c], start + c
            per = max(1, CHUNK_BYTES // (bs * k * bs * 4)) if c else 1
            self.chunks += [_Chunk(self, group[lo:lo + per], k) for lo in range(0, c, per)]
        self.tiles = sum(ch.ids.numel() * ch.k for ch in self.chunks)
        """(query block, key block) tiles computed per pass: the kept blocks, over batch and heads."""

    def scores(self, ch: _Chunk, qc, kc, scale):
        """(c, bs, k*bs) fp32 masked scores of the chunk's units. fp32 queries take the scale themselves
        (block x D multiplies instead of block x k*block); half precision scales the fp32 scores."""
        if qc.dtype == torch.float32:
            s = torch.bmm(qc * scale, kc.transpose(1, 2))
        else:
            s = torch.bmm(qc, kc.transpose(1, 2)).float().mul_(scale)
        s4 = s.view(-1, self.bs, ch.k, self.bs)
        if ch.tile is not None:
            s4.add_(ch.tile)
        if self.seg is not None:
            return self._segment_scores(s, ch)
        if self.diag_last:
            s4[:, :, -1, :].add_(self.causal[0, :, 0, :])
        else:
            s4.addcmul_(ch.diag, self.causal)
        if self.slope is not None:
            s4.addcmul_(ch.slope, self.offset)
        return s

    def _segment_scores(self, s, ch: _Chunk):
        """Token by token (segment ids given): inside the query's document (or a shared id < 0), causal
        except toward input tokens (dense.sdpa_keep_mask's rule); ALiBi on the distance either way."""
        doc, ahead, shared = self.seg
        qr, kr = ch.qrow, ch.krow.reshape(-1)
        c = qr.numel()
        pq, pk = self.pos[qr][:, :, None], self.pos[kr].view(c, 1, -1)
        keep = (doc[qr][:, :, None] == doc[kr].view(c, 1, -1)) | shared[kr].view(c, 1, -1)
        keep &= (pk <= pq) | ahead[kr].view(c, 1, -1)
        s.masked_fill_(~keep, MASKED)
        if self.slope is not None:
            s.addcmul_(ch.slope, (pq - pk).abs().float())
        return s

    def gather(self, t: torch.Tensor, ch: _Chunk) -> torch.Tensor:
        bs, D = self.bs, t.shape[-1]
        return t.view(-1, bs, D).index_select(0, ch.rows).view(-1, ch.k * bs, D)


class BlockGatherAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, block_bias, layout: BlockLayout, scale: float, alibi_slopes, segments, train: bool):
        B, H, S, D = q.shape
        u = _Units(layout, B, H, k.shape[1], q.device, alibi_slopes, block_bias, segments)
        bs = layout.block_size
        qu = q.view(-1, bs, D)
        out = torch.empty_like(q)
        ou = out.view(-1, bs, D)
        kept = [] if train and u.tiles * bs * (bs * 4 + 2 * D * k.element_size()) <= KEEP_BYTES else None
        for ch in u.chunks:
            kc, vc = u.gather(k, ch), u.gather(v, ch)
            p = torch.softmax(u.scores(ch, qu.index_select(0, ch.ids), kc, scale), -1)  # (c, bs, k*bs) fp32
            ou.index_copy_(0, ch.ids, torch.bmm(p.to(v.dtype), vc))
            if kept is not None:
                kept.append((p, kc, vc))
        ctx.save_for_backward(q, k, v, block_bias)
        ctx.units, ctx.scale, ctx.kept = u, scale, kept
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, block_bias = ctx.saved_tensors
        u, scale, kept = ctx.units, ctx.scale, ctx.kept
        ctx.kept = None
        bs, D = u.bs, q.shape[-1]
        qu, dou = q.view(-1, bs, D), do.contiguous().view(-1, bs, D)
        dq = torch.empty_like(q)
        dqu = dq.view(-1, bs, D)
        dk, dv = torch.zeros_like(k), torch.zeros_like(v)
        dku, dvu = dk.view(-1, bs, D), dv.view(-1, bs, D)
        dtile = torch.zeros(u.count, u.kmax, device=q.device) if block_bias is not None else None
        for i, ch in enumerate(u.chunks):
            qc, doc = qu.index_select(0, ch.ids), dou.index_select(0, ch.ids)
            if kept is not None:
                p, kc, vc = kept[i]
            else:  # recompute, as the forward did
                kc, vc = u.gather(k, ch), u.gather(v, ch)
                p = torch.softmax(u.scores(ch, qc, kc, scale), -1)
            dvu.index_add_(0, ch.rows, torch.bmm(p.transpose(1, 2).to(q.dtype), doc).view(-1, bs, D))
            dp = torch.bmm(doc, vc.transpose(1, 2)).float()
            ds = dp.sub_((dp * p).sum(-1, keepdim=True)).mul_(p)  # the softmax backward
            if dtile is not None:
                dtile[ch.ids, :ch.k] = ds.view(-1, bs, ch.k, bs).sum((1, 3))
            ds = ds.to(q.dtype)
            dqu.index_copy_(0, ch.ids, torch.bmm(ds, kc).mul_(scale))
            dku.index_add_(0, ch.rows, torch.bmm(ds.transpose(1, 2), qc).mul_(scale).view(-1, bs, D))
        dbias = None
        if block_bias is not None:  # summed over the dimensions a broadcast bias leaves out
            dbias = dtile.view(*q.shape[:2], -1, u.kmax).sum_to_size(block_bias.shape).to(block_bias.dtype)
        return dq, dk, dv, dbias, None, None, None, None, None


def block_gather_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout, *,
                           scale: float, alibi_slopes: torch.Tensor | None = None,
                           block_bias: torch.Tensor | None = None,
                           segments: torch.Tensor | None = None) -> torch.Tensor:
    """q (B, H, S, D); k, v (B, H_kv, S, D) with H % H_kv == 0; alibi_slopes (H,); block_bias
    (B|1, H|1, n, max_kv) added to every score of that (query block, slot) tile; segments (B, S) int, the
    per-token mask (see layouts.with_segments). Returns (B, H, S, D)."""
    check_qkv(q, k, v, layout, segments)
    q, k, v = (t.contiguous() for t in (q, k, v))
    train = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, block_bias))
    return BlockGatherAttention.apply(q, k, v, block_bias, layout, scale, alibi_slopes, segments, train)
