"""What every attention kernel module shares (dense and block-sparse alike): megatron-core's core_attention
constructor and signature, the softmax scale, this rank's heads under tensor parallelism, ALiBi's slopes,
prefix tuning's keys and values, grouped-query expansion, and the SDPA step that both the dense path and a
KV-cache decode run (queries at the last s of the keys' positions, an allowed-positions mask, ALiBi's
penalty). A kernel subclasses `AttentionModule` and writes only what differs: its forward over a whole
sequence, and its own decode when it has one.

Conventions every kernel keeps (the model and the loader rely on them): the attention mask is None (plain
causal) or (b, s) segment ids, not a boolean mask; an id >= BIDIRECTIONAL marks a prefix-LM input token its
whole document sees; a negative id is a shared prefix every document sees (dense.sdpa_keep_mask); prefix
tuning's `prefix_kv` (model/prefix.py) gives keys and values every query sees; decoding with a KV cache
calls forward with more keys than queries.
"""

from __future__ import annotations

import math

import torch
from megatron.core.transformer.module import MegatronModule

from gorilla_dist.kernels.alibi import alibi_mask, local_alibi_slopes, tp_rank_size


class AttentionModule(MegatronModule):
    def __init__(self, config, *, softmax_scale: float | None = None, pg_collection=None, alibi: bool = False):
        super().__init__(config=config)
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)
        self.num_heads = config.num_attention_heads
        slopes = local_alibi_slopes(self.num_heads, pg_collection) if alibi else None
        self.register_buffer("alibi_slopes", slopes, persistent=False)
        self.prefix_kv = None  # prefix tuning: () -> this layer's (keys, values), each (N, groups / tp, head_dim)

    def rank_heads(self, pg_collection=None) -> None:
        """This tensor-parallel rank's heads: local_heads of them from head_start (for a kernel whose layout
        differs per head)."""
        tp_rank, tp_size = tp_rank_size(pg_collection)
        self.local_heads = self.num_heads // tp_size
        self.head_start = tp_rank * self.local_heads

    def prefix(self, b: int, dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Prefix tuning's (keys, values), each [b, groups, N, hn] in `dtype`; None without prefix tuning."""
        if self.prefix_kv is None:
            return None
        pk, pv = self.prefix_kv()
        return tuple(t.to(dtype).permute(1, 0, 2)[None].expand(b, -1, -1, -1) for t in (pk, pv))

    def attend(self, q, k, v, allowed, *, causal: bool = False, dropout: float = 0.0) -> torch.Tensor:
        """SDPA of q [b, h, s, hn] over k, v [b, groups, s_k, hn] (grouped-query keys expanded to the heads),
        the queries at the last s of the s_k positions: `allowed` (bool, True = may attend) or, when None and
        `causal`, causal; ALiBi's penalty added. Returns [s, b, h * hn], megatron's layout."""
        b, h, s, hn = q.shape
        if k.shape[1] != h:
            rep = h // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if self.alibi_slopes is not None:  # a float mask: the causal -inf plus the distance penalty
            allowed = alibi_mask(self.alibi_slopes, s, k.shape[2], allowed, q.dtype)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout,
                                                               is_causal=causal and allowed is None,
                                                               scale=self.softmax_scale)
        return out.permute(2, 0, 1, 3).reshape(s, b, h * hn)


def with_prefix_columns(allowed: torch.Tensor, n: int) -> torch.Tensor:
    """An allowed-positions mask (..., s, s_k) with n leading key columns every query may see (prefix tuning)."""
    return torch.cat([allowed.new_ones(*allowed.shape[:-1], n), allowed], dim=-1)
