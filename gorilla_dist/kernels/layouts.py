"""Block-sparse attention layouts: the one contract between layout builders and kernels.

A layout says, for every (batch, head, query block m), which key blocks that query block visits:
`kv_num_blocks[b, h, m]` of them, listed in ascending order in `kv_indices[b, h, m, :kv_num_blocks]`
(the same shape FlexAttention's BlockMask uses). Slots past `kv_num_blocks` are padding and are
never read as keys. Batch and head dimensions may be 1 and are broadcast: a static pattern is
stored once, not once per head.

Attention is causal (decoder-only): a key block above the diagonal is never listed, and inside the
diagonal block each query sees keys at positions <= its own. Every layout keeps the diagonal block,
so no query row is ever empty. The one exception is prefix-LM data (`with_segments`): a document's
input tokens are seen by its earlier tokens too, so the kernels then take per-token segment ids and
the layout gains the mirror images of its blocks where such tokens lie ahead.

Builders: `causal` (dense), `sliding` (local window), `strided` (Sparse Transformer "fixed"),
`bigbird` (global + window + seeded random), `from_lists` (any user-given lists) and `topk` (the
learned layout's selection from block scores; see gorilla_dist.kernels.sparse_attention).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from gorilla_dist.kernels.limits import BIDIRECTIONAL, BLOCK_SIZES


@dataclass(frozen=True)
class BlockLayout:
    kv_num_blocks: torch.Tensor
    """(B|1, H|1, n_blocks) int32: key blocks visited by each query block."""
    kv_indices: torch.Tensor
    """(B|1, H|1, n_blocks, max_kv) int32: their indices, ascending; padding slots past kv_num_blocks."""
    block_size: int

    @property
    def n_blocks(self) -> int:
        return self.kv_indices.shape[2]

    @property
    def seq_len(self) -> int:
        return self.n_blocks * self.block_size

    @property
    def max_kv(self) -> int:
        return self.kv_indices.shape[3]

    def valid_slots(self) -> torch.Tensor:
        """(B|1, H|1, n, max_kv) bool: which slots hold a key block."""
        slots = torch.arange(self.max_kv, device=self.kv_indices.device)
        return slots < self.kv_num_blocks[..., None]

    def block_mask(self) -> torch.Tensor:
        """(B|1, H|1, n, n) bool: True where query block m visits key block j."""
        mask = torch.zeros(*self.kv_indices.shape[:3], self.n_blocks + 1, dtype=torch.bool,
                           device=self.kv_indices.device)
        # padding slots scatter into the spare last column, which is then dropped
        idx = torch.where(self.valid_slots(), self.kv_indices.long(), self.n_blocks)
        return mask.scatter_(-1, idx, True)[..., :-1]

    def dense_mask(self) -> torch.Tensor:
        """(B|1, H|1, S, S) bool, True = query may attend key: the layout expanded to tokens, causal."""
        bs = self.block_size
        tokens = self.block_mask().repeat_interleave(bs, -1).repeat_interleave(bs, -2)
        causal = torch.ones(self.seq_len, self.seq_len, dtype=torch.bool, device=tokens.device).tril()
        return tokens & causal

    def density(self) -> float:
        """Kept blocks / causal blocks (1.0 = dense causal), averaged over batch and heads."""
        n = self.n_blocks
        return self.kv_num_blocks.double().mean().item() * n / (n * (n + 1) / 2)

    @cached_property  # a static layout is built once, so its backward walk is too
    def transposed(self):
        """For the backward over key blocks: for every key block j, the query blocks that visit it and
        the slot j has in each of their lists: (q_num_blocks (B|1, H|1, n), q_indices and
        q_slots (B|1, H|1, n, max_q)), int32, ascending by query block."""
        slot_of = torch.full((*self.kv_indices.shape[:3], self.n_blocks + 1), -1, dtype=torch.long,
                             device=self.kv_indices.device)
        idx = torch.where(self.valid_slots(), self.kv_indices.long(), self.n_blocks)
        slots = torch.arange(self.max_kv, device=idx.device).expand_as(idx)
        slot_of = slot_of.scatter_(-1, idx, slots)[..., :-1].transpose(-1, -2)  # (B, H, key j, query m)
        kept = slot_of >= 0
        q_num = kept.sum(-1)
        order = torch.sort((~kept).to(torch.int8), dim=-1, stable=True).indices  # kept first, ascending m
        max_q = max(int(q_num.max()), 1)
        q_idx = order[..., :max_q]
        q_slot = slot_of.gather(-1, q_idx).clamp_min(0)
        return q_num.int(), q_idx.int(), q_slot.int()

    def to(self, device) -> "BlockLayout":
        if self.kv_indices.device == torch.device(device):
            return self
        return BlockLayout(self.kv_num_blocks.to(device), self.kv_indices.to(device), self.block_size)

    def heads(self, start: int, stop: int) -> "BlockLayout":
        """The layout of heads [start, stop) (a tensor-parallel rank's local heads)."""
        if self.kv_indices.shape[1] == 1:
            return self
        return BlockLayout(self.kv_num_blocks[:, start:stop], self.kv_indices[:, start:stop], self.block_size)


def check_block_size(seq_len: int, block_size: int, where: str = "block_size") -> int:
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"{where}={block_size}: must be one of {', '.join(map(str, BLOCK_SIZES))}")
    if seq_len % block_size:
        raise ValueError(f"sequence length {seq_len} is not a multiple of {where}={block_size}")
    return seq_len // block_size


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout, segments=None) -> None:
    """The shapes every block-sparse kernel takes: q (B, H, S, D), k and v (B, H_kv, S, D), H divisible by
    H_kv, S the layout's length; segments (B, S) integer when given."""
    B, H, S, D = q.shape
    if segments is not None and (tuple(segments.shape) != (B, S) or segments.is_floating_point()):
        raise ValueError(f"block-sparse attention: segments {tuple(segments.shape)} {segments.dtype}: expected "
                         f"({B}, {S}) integer ids")
    if k.shape[1] == 0 or H % k.shape[1] or k.shape != v.shape or k.shape[0] != B or k.shape[2:] != (S, D):
        raise ValueError(f"block-sparse attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: "
                         "expected (B, H, S, D) and (B, H_kv, S, D) with H divisible by H_kv")
    if S != layout.seq_len:
        raise ValueError(f"sequence length {S} != layout's {layout.seq_len} "
                         f"({layout.n_blocks} blocks of {layout.block_size})")


def from_block_mask(mask: torch.Tensor, block_size: int) -> BlockLayout:
    """A layout from a (B|1, H|1, n, n) bool block mask; above-diagonal entries are dropped and the
    diagonal is always kept."""
    while mask.dim() < 4:
        mask = mask[None]
    n = mask.shape[-1]
    eye = torch.eye(n, dtype=torch.bool, device=mask.device)
    return _from_mask((mask & torch.ones_like(eye).tril()) | eye, block_size)


def _from_mask(mask: torch.Tensor, block_size: int) -> BlockLayout:
    """The layout of a (B|1, H|1, n, n) block mask, taken as it is."""
    num = mask.sum(-1)
    order = torch.sort((~mask).to(torch.int8), dim=-1, stable=True).indices  # kept first, ascending
    max_kv = int(num.max())
    idx = order[..., :max_kv]
    idx = torch.where(torch.arange(max_kv, device=mask.device) < num[..., None], idx, 0)
    return BlockLayout(num.int(), idx.int().contiguous(), block_size)


def _grid(n: int, device=None):
    m = torch.arange(n, device=device)
    return m[:, None], m[None, :]  # query block, key block


def causal(seq_len: int, block_size: int, device=None) -> BlockLayout:
    n = check_block_size(seq_len, block_size)
    m, j = _grid(n, device)
    return from_block_mask(j <= m, block_size)


def sliding(seq_len: int, block_size: int, window: int, device=None) -> BlockLayout:
    """Local attention: each query block sees itself and the `window - 1` blocks before it."""
    n = check_block_size(seq_len, block_size)
    if window < 1:
        raise ValueError(f"window={window} blocks: must be >= 1")
    m, j = _grid(n, device)
    return from_block_mask((j <= m) & (j > m - window), block_size)


def strided(seq_len: int, block_size: int, stride: int, window: int = 1, device=None) -> BlockLayout:
    """Sparse Transformer's "fixed" pattern (Child et al. 2019, sec. 4.2): every query block sees the
    blocks of its own stride-long chunk up to itself, the last block of every earlier chunk (the
    "summary" columns that carry information forward), and a local window."""
    n = check_block_size(seq_len, block_size)
    if stride < 1 or window < 1:
        raise ValueError(f"stride={stride}, window={window}: both must be >= 1 (blocks)")
    m, j = _grid(n, device)
    chunk = (j // stride == m // stride) & (j <= m)
    summary = (j % stride == stride - 1) & (j < m)
    local = (j <= m) & (j > m - window)
    return from_block_mask(chunk | summary | local, block_size)


def bigbird(seq_len: int, block_size: int, *, num_heads: int, global_blocks: int, window: int,
            random_blocks: int, seed: int, device=None) -> BlockLayout:
    """BigBird (Zaheer et al. 2020), causal: the first `global_blocks` key blocks (global tokens),
    a local window, and `random_blocks` further earlier blocks per query block, drawn per head from a
    generator seeded with `seed` — the same pattern on every rank and for every tensor-parallel split."""
    n = check_block_size(seq_len, block_size)
    if global_blocks < 0 or window < 1 or random_blocks < 0:
        raise ValueError(f"global_blocks={global_blocks} (>= 0), window={window} (>= 1), "
                         f"random_blocks={random_blocks} (>= 0)")
    m, j = _grid(n)
    base = (j <= m) & ((j < global_blocks) | (j > m - window))
    gen = torch.Generator().manual_seed(seed)
    noise = torch.rand(num_heads, n, n, generator=gen)
    # random picks among the causal blocks the fixed part does not already cover
    noise = noise.masked_fill(base | (j > m), 2.0)
    k = min(random_blocks, n)
    picked = torch.zeros(num_heads, n, n, dtype=torch.bool)
    if k:
        val, idx = noise.topk(k, dim=-1, largest=False)
        picked.scatter_(-1, idx, val < 2.0)
    return from_block_mask((base | picked)[None].to(device), block_size)


def from_lists(lists, seq_len: int, block_size: int, device=None) -> BlockLayout:
    """Any user-given pattern: `lists[m]` are the key blocks query block m visits (the diagonal is
    added if missing); or one such list of lists per head."""
    n = check_block_size(seq_len, block_size)
    per_head = lists and isinstance(lists[0], (list, tuple)) and lists[0] and isinstance(lists[0][0], (list, tuple))
    heads = lists if per_head else [lists]
    mask = torch.zeros(len(heads), n, n, dtype=torch.bool)
    for h, rows in enumerate(heads):
        if len(rows) != n:
            raise ValueError(f"layout lists: {len(rows)} rows for {n} query blocks (seq {seq_len} / block {block_size})")
        for m, cols in enumerate(rows):
            for j in cols:
                if not 0 <= j <= m:
                    raise ValueError(f"layout lists: query block {m} lists key block {j}; "
                                     f"causal attention allows 0..{m}")
                mask[h, m, j] = True
    return from_block_mask(mask[None].to(device), block_size)


def forced_blocks(n: int, *, keep_first: bool, device=None) -> torch.Tensor:
    """(n, n) bool: the blocks the learned layout always keeps: the diagonal, and block 0 when keep_first."""
    m, j = _grid(n, device)
    return (j == m) | ((j == 0) & keep_first)


def topk(scores: torch.Tensor, k: int, *, keep_first: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The learned layout's selection. scores (B, H, n, n) (query block, key block); returns
    kv_num_blocks (B, H, n) and kv_indices (B, H, n, k), ascending: the forced blocks (forced_blocks)
    and the best-scoring remaining earlier blocks, k in all (fewer where fewer exist)."""
    n = scores.shape[-1]
    m, j = _grid(n, scores.device)
    forced = forced_blocks(n, keep_first=keep_first, device=scores.device)
    s = scores.detach().float().masked_fill(j > m, float("-inf")).masked_fill(forced, float("inf"))
    k = min(k, n)
    val, idx = s.topk(k, dim=-1)
    valid = val > float("-inf")
    num = valid.sum(-1)
    # ascending block order, padding (invalid) slots last
    key = torch.where(valid, idx, n + 1)
    idx = key.sort(-1).values
    idx = torch.where(idx > n, 0, idx)
    return num.int(), idx.int()


def with_segments(layout: BlockLayout, segments: torch.Tensor, block_bias: torch.Tensor | None = None):
    """(layout, block_bias) for the segment ids of a batch (B, S) (kernels/dense.sdpa_keep_mask's meaning:
    attention stays inside a document, causal except toward its input tokens, ids >= BIDIRECTIONAL).
    A query block m gains key block j > m where the layout pairs them the other way round (j visits m)
    and j holds input tokens of a document that m holds: inside the layout, attention over an input is
    then symmetric, so a sparse pattern stays sparse (full causal becomes the full prefix-LM mask).
    Documents are compared as each block's id range (min..max): a superset, so a block is never
    missed, at worst visited and then masked token by token. The added slots have bias 0."""
    bid = segments >= BIDIRECTIONAL
    if not bool(bid.any()):  # documents only: the pattern as it is (a static one keeps its cached walk)
        return layout, block_bias
    n, bs = layout.n_blocks, layout.block_size
    doc = torch.where(bid, segments - BIDIRECTIONAL, segments).view(-1, n, bs).long()
    bid = bid.view(-1, n, bs)
    top = 1 << 40
    lo, hi = doc.amin(-1), doc.amax(-1)  # (B, n) the documents of each block
    in_lo = torch.where(bid, doc, top).amin(-1)  # the documents whose input each block holds
    in_hi = torch.where(bid, doc, -top).amax(-1)
    ahead = (in_lo[:, None, :] <= hi[:, :, None]) & (in_hi[:, None, :] >= lo[:, :, None])  # (B, m, j)
    m, j = _grid(n, segments.device)
    base = layout.block_mask()
    mask = base | (base.transpose(-1, -2) & ahead[:, None] & (j > m))
    new = _from_mask(mask, bs)
    if block_bias is not None:  # each kept slot's bias moves to that block's new slot
        slot = torch.where(new.valid_slots(), new.kv_indices.long(), n)
        block_bias = bias_by_block(layout, block_bias).gather(-1, slot.expand(*block_bias.shape[:3], -1))
    return new, block_bias


def bias_by_block(layout: BlockLayout, block_bias: torch.Tensor) -> torch.Tensor:
    """(B, H, n, n + 1): the per-slot `block_bias` (B, H, n, max_kv) at the key block each slot lists, 0 at
    blocks not listed (the last column collects the padding slots)."""
    n = layout.n_blocks
    col = torch.where(layout.valid_slots(), layout.kv_indices.long(), n).expand(*block_bias.shape)
    return block_bias.new_zeros(*block_bias.shape[:3], n + 1).scatter(-1, col, block_bias)
