"""What the kernels can do, as plain constants and one error type (no torch import: the config
validation imports these without loading any kernel)."""

BLOCK_SIZES = (16, 32, 64, 128)
"""Block-sparse attention block sizes (tokens) the CPU and Triton kernels support."""
TRITON_HEAD_DIMS = (16, 32, 64, 128, 256)
"""Head dims the Triton block-sparse kernels take; others run on the block-gather path (any head dim)."""


class UnsupportedAttention(ValueError):
    """A kernel was asked for something it cannot do on this machine or with these inputs. The model
    builder (gorilla_dist/model/spec.py) turns it into a config error naming model.attention."""

BIDIRECTIONAL = 1 << 30
"""Segment ids >= this mark a prefix-LM's input tokens (document id + BIDIRECTIONAL): every token of their
document sees them, also the earlier ones (the input part is bidirectional, the rest causal)."""
