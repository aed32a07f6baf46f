"""Model construction: a megatron-core GPTModel from a ModuleSpec built in one place (spec.py)."""

from gorilla_dist.model.spec import build_model, flops_per_token, padded_vocab_size, unpadded_logits

__all__ = ["build_model", "flops_per_token", "padded_vocab_size", "unpadded_logits"]
