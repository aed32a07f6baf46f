"""ALiBi (Press et al. 2022, "Train Short, Test Long"): a per-head linear penalty on distance,
score(i, j) -= slope_h * |i - j|, in place of position embeddings."""

from __future__ import annotations

import math

import torch


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """(num_heads,) fp32 slopes: the geometric sequence 2^(-8/n), 2^(-16/n), ... for n a power of
    two; otherwise the reference implementation's rule (the power-of-two sequence for the nearest
    lower power, then every other slope of the next one)."""
    def powers(n: int) -> list[float]:
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start ** (i + 1) for i in range(n)]

    if num_heads & (num_heads - 1) == 0:
        slopes = powers(num_heads)
    else:
        low = 2 ** math.floor(math.log2(num_heads))
        slopes = powers(low) + powers(2 * low)[0::2][: num_heads - low]
    return torch.tensor(slopes, dtype=torch.float32)


def local_alibi_slopes(num_heads: int, pg_collection=None) -> torch.Tensor:
    """The slopes of this tensor-parallel rank's heads: [tp_rank * local, (tp_rank + 1) * local)."""
    rank, size = tp_rank_size(pg_collection)
    local = num_heads // size
    return alibi_slopes(num_heads)[rank * local:(rank + 1) * local]


def tp_rank_size(pg_collection=None) -> tuple[int, int]:
    """(rank, size) in the tensor-parallel group: from megatron's pg_collection when the layer got
    one, else from parallel_state."""
    group = getattr(pg_collection, "tp", None) if pg_collection is not None else None
    if group is None:
        from megatron.core import parallel_state as ps

        return ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    return group.rank(), group.size()


def alibi_mask(slopes: torch.Tensor, s: int, t: int, allowed: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """SDPA's float mask (in `dtype`, the attention's) for queries at the last s of t key positions:
    -slope * |query - key| where `allowed` (bool, True = may attend; None: causal), -inf elsewhere. (h,)
    slopes -> (1, h, s, t). Computed in fp32 and cast once, as flash-attn and the block-sparse kernels compute
    it (bf16 distances would round above 256). The distance counts either way: a prefix-LM's input tokens
    ahead of a query are penalised as far as those behind it (as bidirectional ALiBi does), never rewarded."""
    device = slopes.device
    dist = (torch.arange(t - s, t, device=device)[:, None] - torch.arange(t, device=device)).float()
    keep = dist >= 0 if allowed is None else allowed
    return (-slopes.float().view(1, -1, 1, 1) * dist.abs()).to(dtype).masked_fill(~keep, float("-inf"))
