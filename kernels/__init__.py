"""Attention kernels that plug into megatron-core's `core_attention` slot (shipped as
`gorilla_dist.kernels`; the top-level name `kernels` belongs to an unrelated PyPI package)."""

from gorilla_dist.kernels.dense import DenseAttention

CORE_ATTENTION = {"dense": DenseAttention}

__all__ = ["CORE_ATTENTION", "DenseAttention"]
