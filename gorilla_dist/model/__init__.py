"""Model construction: a megatron-core GPTModel from a ModuleSpec built in one place (spec.py).

The names below load spec.py (and megatron-core, several seconds) on first use, so that importing
`gorilla_dist.model.head` / `.prefix` / `.prompts` for their names alone (checkpoint tools, the
launcher's checks) does not import megatron-core."""

__all__ = ["build_model", "flops_per_token", "padded_vocab_size", "unpadded_logits"]


def __getattr__(name: str):
    if name in __all__:
        from gorilla_dist.model import spec

        return getattr(spec, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
