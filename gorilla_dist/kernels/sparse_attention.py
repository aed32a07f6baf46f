"""Block-sparse attention as megatron-core `core_attention` modules (static and learned layouts).

Both take megatron's DotProductAttention constructor and forward (see dense.py), plus the keyword
arguments the spec passes through `ModuleSpec.params` (gorilla_dist.model.spec). Inputs arrive as
[s, b, local_heads, d]; with tensor parallelism each rank holds heads
[tp_rank * local_heads, (tp_rank + 1) * local_heads) and uses that slice of a static layout and of
the ALiBi slopes, so every tensor-parallel split computes the same model.

`LearnedSparseAttention` learns its layout, in the spirit of MoBA (Lu et al. 2025, "Mixture of
Block Attention") and Native Sparse Attention (Yuan et al. 2025): each query block scores every
earlier key block by its mean-pooled query against the block's mean-pooled key, through a
learned per-head map, and keeps the top-k (always its own block, and the first block when
`keep_first`). The top-k choice itself is discrete; the differentiable path is a gate, as in a
mixture-of-experts router: the scores of a selected, non-forced block's keys get
log(sigmoid(score + bias)) added, so the loss gradient reaches the scoring parameters through
every block it kept, and blocks whose gate it lowers fall out of the top-k.

Generation with a KV cache (gorilla_dist.inference.Decoder): a static layout does not depend on the
tokens, so the last queries of a longer sequence see exactly the keys they see when the whole sequence
runs — the layout's rows for those positions, expanded to tokens (`decode`, plain SDPA: a few queries).
A learned layout picks a block's keys from the mean of all its queries, so an earlier token's output
changes as its block fills: the outputs a cache keeps would not be the uncached model's, and learned
layouts re-run the context instead (gorilla_dist.inference.caches).

Segment ids (packed documents with data.reset_at_eod or packed examples, and the objectives' prefix-LM
inputs: kernels/dense.sdpa_keep_mask's meaning) arrive as the attention mask (b, s); the kernels mask
every tile token by token, and the layout gains, per batch, the mirror image of its blocks where a
document's input tokens lie ahead (layouts.with_segments): inside the pattern, attention over an input
is symmetric, and the full causal layout gives exactly the dense prefix-LM mask.

Prefix tuning (gorilla_dist/model/prefix.py sets `prefix_kv`): N learned keys and values that every query
sees. With N a multiple of the block size they are P = N / block_size whole key blocks: the kernels run
on [prefix; sequence] with the layout shifted by P blocks and the P prefix blocks added to every query
block's list (`with_prefix`); the prefix's own query rows are zeros whose outputs are dropped. Positions
are those of the dense path (tokens at N.., ALiBi distances to the prefix included), so the kernels
themselves are unchanged.
"""

from __future__ import annotations

import torch

from gorilla_dist.kernels import layouts
from gorilla_dist.kernels.base import AttentionModule, with_prefix_columns
from gorilla_dist.kernels.block_sparse import block_sparse_attention
from gorilla_dist.kernels.limits import BIDIRECTIONAL, UnsupportedAttention


class _BlockSparseBase(AttentionModule):
    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None, *, block_size: int = 64,
                 alibi: bool = False, **pattern):
        super().__init__(config, softmax_scale=softmax_scale, pg_collection=pg_collection, alibi=alibi)
        if (config.attention_dropout if attention_dropout is None else attention_dropout) > 0:
            raise UnsupportedAttention("block-sparse attention does not implement attention dropout")
        self.block_size, self.pattern = block_size, pattern
        self.rank_heads(pg_collection)

    def _prefix(self, b: int, dtype):
        """(keys, values) [b, groups, N, hn] of prefix tuning in whole blocks, or None."""
        prefix = self.prefix(b, dtype)
        if prefix is not None and prefix[0].shape[2] % self.block_size:
            raise UnsupportedAttention(f"{prefix[0].shape[2]} prefix keys are not whole blocks of {self.block_size}: "
                                       "set finetune.virtual_tokens to a multiple of model.sparse.block_size")
        return prefix

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        # packed_seq_params (kernels/dense.packed_documents, for flash-attn's varlen kernel) says what the segment
        # ids say, which these kernels read
        segments = attention_mask
        if (segments is not None and (segments.dtype == torch.bool or segments.dim() != 2)) \
                or attention_bias is not None:
            raise NotImplementedError(f"{type(self).__name__}: boolean attention masks and attention_bias are not "
                                      "supported (segment ids are)")
        s, b, np_, hn = query.shape
        if key.shape[0] != s:  # decoding with a KV cache: the queries are the last s of the keys' positions
            if segments is not None:
                raise UnsupportedAttention(f"{type(self).__name__} decodes from a KV cache without segment ids")
            return self.decode(query, key, value)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, h, s, hn]
        pad = -s % self.block_size
        if pad:  # e.g. sampling at any length: pad the end; causal, so earlier positions never see it
            q, k, v = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
            if segments is not None:  # (a document of its own)
                segments = torch.nn.functional.pad(segments, (0, pad), value=BIDIRECTIONAL - 1)
        prefix = self._prefix(b, k.dtype)
        n_pre = 0 if prefix is None else prefix[0].shape[2]
        layout, block_bias = self.select(q, k, n_pre // self.block_size, segments)
        if prefix is not None:  # [prefix; sequence], the prefix's own (zero) queries dropped below
            q = torch.cat([q.new_zeros(b, np_, n_pre, hn), q], 2)
            k, v = torch.cat([prefix[0], k], 2), torch.cat([prefix[1], v], 2)
            if segments is not None:  # a shared id: every document sees the prefix
                segments = torch.cat([segments.new_full((b, n_pre), -1), segments], 1)
        out = block_sparse_attention(q, k, v, layout, scale=self.softmax_scale, alibi_slopes=self.alibi_slopes,
                                     block_bias=block_bias, segments=segments)
        return out[:, :, n_pre:n_pre + s].permute(2, 0, 1, 3).reshape(s, b, np_ * hn)  # [s, b, np*hn]

    def arrange(self, layout, block_bias, prefix_blocks: int, segments):
        """The kernels' (layout, block_bias) from the pattern's: the mirrored blocks of a batch's segments
        (layouts.with_segments), then the prefix blocks (with_prefix)."""
        if segments is not None:
            layout, block_bias = layouts.with_segments(layout, segments, block_bias)
        return with_prefix(layout, block_bias, prefix_blocks)


    def decode(self, query, key, value):
        raise UnsupportedAttention(f"{type(self).__name__} cannot attend from a KV cache (see the module docstring); "
                                   "generate with cache=false")


class StaticSparseAttention(_BlockSparseBase):
    """A fixed layout, built once per (sequence length, device): pattern `kind` = sliding | strided |
    bigbird (model.attention), with that builder's sizes (in blocks) as keyword arguments."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._cache: dict = {}
        self._masks: dict = {}

    def decode(self, query, key, value):
        """The last s of s_k positions: each query's row of the layout (tokens, causal), by SDPA."""
        s, b, np_, hn = query.shape
        s_k = key.shape[0]
        n = s_k + (-s_k % self.block_size)
        if (n, query.device) not in self._masks:  # (1, h, n, n) token mask of the layout, kept per length
            self._masks[(n, query.device)] = self.build_layout(n).to(query.device).dense_mask()
        allowed = self._masks[(n, query.device)][..., s_k - s:s_k, :s_k]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, h, s, hn]
        prefix = self._prefix(b, k.dtype)
        if prefix is not None:  # seen by every query
            k, v = torch.cat([prefix[0], k], 2), torch.cat([prefix[1], v], 2)
            allowed = with_prefix_columns(allowed, prefix[0].shape[2])
        return self.attend(q, k, v, allowed)  # (ALiBi's distances: prefix included; the queries are the last s)

    def build_layout(self, seq_len: int) -> layouts.BlockLayout:
        p, bs = self.pattern, self.block_size
        kind = p["kind"]
        if kind == "sliding":
            lay = layouts.sliding(seq_len, bs, p["window"])
        elif kind == "strided":
            lay = layouts.strided(seq_len, bs, p["stride"], p["window"])
        elif kind == "bigbird":
            lay = layouts.bigbird(seq_len, bs, num_heads=self.num_heads, global_blocks=p["global_blocks"],
                                  window=p["window"], random_blocks=p["random_blocks"], seed=p["seed"])
        else:
            raise ValueError(f"unknown static layout kind {kind!r}")
        return lay.heads(self.head_start, self.head_start + self.local_heads)

    def select(self, q, k, prefix_blocks: int = 0, segments=None):
        key = (q.shape[2], q.device, prefix_blocks)
        if segments is not None:  # a layout per batch
            return self.arrange(self._base(q), None, prefix_blocks, segments)
        if key not in self._cache:  # (kept: a static layout's backward walk is built once)
            self._cache[key] = self.arrange(self._base(q), None, prefix_blocks, None)[0]
        return self._cache[key], None

    def _base(self, q):
        key = (q.shape[2], q.device)
        if key not in self._cache:
            self._cache[key] = self.build_layout(q.shape[2]).to(q.device)
        return self._cache[key]


class LearnedSparseAttention(_BlockSparseBase):
    """Learned top-k block selection; `topk` key blocks per query block in all (forced ones included)."""

    def __init__(self, *args, topk: int = 8, keep_first: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.topk, self.keep_first = topk, keep_first
        d = self.config.kv_channels
        # The key map is identity + score_delta; score_delta starts at 0 and weight decay pulls it back
        # there, so the untrained selection is MoBA's plain pooled-query . pooled-key score.
        self.score_delta = torch.nn.Parameter(torch.zeros(self.local_heads, d, d, dtype=self.config.params_dtype))
        self.score_bias = torch.nn.Parameter(torch.zeros(self.local_heads, dtype=self.config.params_dtype))
        for p in (self.score_delta, self.score_bias):  # one slice per local head: split like the heads under TP
            p.tensor_model_parallel, p.partition_dim, p.partition_stride = True, 0, 1
        self.last_layout: layouts.BlockLayout | None = None

    def block_scores(self, q, k) -> torch.Tensor:
        """(b, h, n, n) scores of (query block, key block); q [b, h, s, d], k [b, h_kv, s, d]."""
        b, h, s, d = q.shape
        n = s // self.block_size
        qp = q.reshape(b, h, n, self.block_size, d).mean(3)
        kp = k.reshape(b, k.shape[1], n, self.block_size, d).mean(3).repeat_interleave(h // k.shape[1], 1)
        kp = kp + kp @ self.score_delta.to(kp.dtype)
        return (qp @ kp.transpose(-1, -2)).float() * self.softmax_scale + self.score_bias.float().view(1, h, 1, 1)

    def select(self, q, k, prefix_blocks: int = 0, segments=None):
        layouts.check_block_size(q.shape[2], self.block_size, "model.sparse.block_size")
        scores = self.block_scores(q, k)
        num, idx = layouts.topk(scores, self.topk, keep_first=self.keep_first)
        layout = layouts.BlockLayout(num, idx, self.block_size)
        idx = idx.long()
        forced = layouts.forced_blocks(layout.n_blocks, keep_first=self.keep_first, device=q.device)
        forced = forced.expand(*idx.shape[:2], -1, -1).gather(-1, idx)  # per slot
        gate = torch.nn.functional.logsigmoid(scores.gather(-1, idx))
        block_bias = torch.where(forced | ~layout.valid_slots(), 0.0, gate)
        self.last_layout = layout
        return self.arrange(layout, block_bias, prefix_blocks, segments)


def with_prefix(layout: layouts.BlockLayout, block_bias, p: int):
    """(layout, block_bias) of [p prefix blocks; the sequence]: every query block of the sequence visits the
    p prefix blocks (bias 0) and its own layout's blocks shifted by p; prefix query block m visits blocks
    0..m (rows whose outputs the caller drops)."""
    if not p:
        return layout, block_bias
    num, idx = layout.kv_num_blocks, layout.kv_indices  # (B|1, H|1, n), (B|1, H|1, n, max_kv)
    lead, n, width = idx.shape[:2], layout.n_blocks, p + layout.max_kv
    slots = torch.arange(width, dtype=idx.dtype, device=idx.device)
    own = slots[:p].expand(*lead, n, p)  # the prefix blocks 0..p-1
    first = slots.expand(p, width).clamp(max=torch.arange(p, device=idx.device)[:, None].to(idx.dtype))
    idx = torch.cat([first.expand(*lead, p, width), torch.cat([own, idx + p], -1)], 2)
    num = torch.cat([torch.arange(1, p + 1, dtype=num.dtype, device=num.device).expand(*lead, p), num + p], 2)
    if block_bias is not None:  # (b, h, n, max_kv): no gate on the prefix
        block_bias = torch.nn.functional.pad(block_bias, (p, 0, p, 0))
    return layouts.BlockLayout(num.contiguous(), idx.contiguous(), layout.block_size), block_bias
