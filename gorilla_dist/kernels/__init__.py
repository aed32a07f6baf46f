"""Attention kernels that plug into megatron-core's `core_attention` slot.

They live in gorilla_dist/kernels/, not in a top-level kernels/ folder: `kernels` is the name of Hugging
Face's package (a dependency of transformers), and a top-level package of ours with that name shadowed it
for anything run from the checkout root (pytest, `python -m launcher`), breaking transformers' imports.

`model.attention` names a kernel of registry.py, which declares what it supports (Capabilities) and gives
the module for megatron's slot (`core_attention_spec(m)`):
  dense    flash-attn on GPU when installed, else SDPA          (dense.py)
  flash    flash-attn, and an error instead of a fallback       (dense.py)
  sliding | strided | bigbird   static block-sparse layouts      (sparse_attention.py, layouts.py)
  learned  learned top-k block selection                        (sparse_attention.py)
A new kernel: an AttentionKernel subclass registered by name (registry.py says how), whose module
subclasses base.AttentionModule (what every kernel shares: heads under TP, ALiBi, prefix tuning's keys,
grouped-query expansion, the SDPA decode step; the conventions of segment ids); nothing outside this
package tests a kernel's name.
The block-sparse kernels: Triton on CUDA (block_sparse.py), block-gather on CPU (block_gather.py).
The kernels know torch, Triton and megatron's attention signature only; their limits are plain
constants in limits.py (the config imports them), and they raise ValueError (limits.UnsupportedAttention).
Importing this package loads no kernel: the modules are imported on first use.
"""


def core_attention_spec(m) -> tuple[type, dict]:
    """(module class, constructor keyword arguments) for a ModelConfig's attention choice."""
    from gorilla_dist.kernels.registry import attention_kernel

    return attention_kernel(m.attention).module(m)


def __getattr__(name: str):
    """The attention modules, loaded on first use (so `gorilla_dist.kernels.limits` stays light)."""
    if name == "DenseAttention":
        from gorilla_dist.kernels.dense import DenseAttention

        return DenseAttention
    if name in ("LearnedSparseAttention", "StaticSparseAttention"):
        from gorilla_dist.kernels import sparse_attention

        return getattr(sparse_attention, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DenseAttention", "LearnedSparseAttention", "StaticSparseAttention", "core_attention_spec"]
