"""Attention kernels that plug into megatron-core's `core_attention` slot.

They live in gorilla_dist/kernels/, not in a top-level kernels/ folder: `kernels` is the name of Hugging
Face's package (a dependency of transformers), and a top-level package of ours with that name shadowed it
for anything run from the checkout root (pytest, `python -m launcher`), breaking transformers' imports.

`core_attention_spec(m)` maps `model.attention` to a module and its keyword arguments:
  dense    flash-attn on GPU when installed, else SDPA          (dense.py)
  flash    flash-attn, and an error instead of a fallback       (dense.py)
  sliding | strided | bigbird   static block-sparse layouts      (sparse_attention.py, layouts.py)
  learned  learned top-k block selection                        (sparse_attention.py)
The block-sparse kernels: Triton on CUDA (block_sparse.py), block-gather on CPU (block_gather.py).
The kernels know torch, Triton and megatron's attention signature only; their limits are plain
constants in limits.py (the config imports them), and they raise ValueError (limits.UnsupportedAttention).
Importing this package loads no kernel: the modules are imported on first use.
"""


def core_attention_spec(m) -> tuple[type, dict]:
    """(module class, constructor keyword arguments) for a ModelConfig's attention choice."""
    from gorilla_dist.kernels.dense import DenseAttention
    from gorilla_dist.kernels.sparse_attention import LearnedSparseAttention, StaticSparseAttention

    alibi = m.position_embedding == "alibi"
    if m.attention in ("dense", "flash"):
        return DenseAttention, {"require_flash": m.attention == "flash", "alibi": alibi}
    sp = m.sparse
    common = {"block_size": sp.block_size, "alibi": alibi}
    if m.attention == "learned":
        return LearnedSparseAttention, {**common, "topk": sp.topk, "keep_first": sp.keep_first}
    sizes = {"sliding": {"window": sp.window},
             "strided": {"stride": sp.stride, "window": sp.window},
             "bigbird": {"global_blocks": sp.global_blocks, "window": sp.window,
                         "random_blocks": sp.random_blocks, "seed": sp.seed}}[m.attention]
    return StaticSparseAttention, {**common, "kind": m.attention, **sizes}


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
