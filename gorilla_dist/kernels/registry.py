"""Attention kernels as plug-ins: each declares what it supports, and the config check, the model spec,
inference and export read the declaration instead of testing the kernel's name (OLMo-core's
AttentionBackend). No torch here: the launcher checks a config against the declarations.

A kernel is an `AttentionKernel` subclass: its `name` (model.attention=<name>), its `supports`
(Capabilities), `module(m)` (the megatron core_attention module and its keyword arguments, imported on
first use) and optional checks. Register one with `register_attention(MyKernel)` in the process that
trains, or as an installed package's entry point in the group `gorilla_dist.attention` (the launcher and
every worker find it by name). A refusal names the capability the kernel lacks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from gorilla_dist.kernels.limits import BLOCK_SIZES, UnsupportedAttention

ENTRY_POINTS = "gorilla_dist.attention"


@dataclass(frozen=True)
class Capabilities:
    """What a kernel computes, as the rest of the framework asks it."""

    dropout: bool = False
    """Attention dropout (model.dropout > 0)."""
    kv_cache: bool = False
    """Decoding with a KV cache (generate): a new token's output from the cached keys and values alone."""
    prompt_tuning: bool = False
    """Prompt tuning's virtual tokens in front of the sequence, seen by every later token."""
    prefix_tuning: bool = True
    """Prefix tuning's learned keys and values in front (the module's prefix_kv)."""
    segments: bool = True
    """Segment ids through the attention mask: packed documents, prefix-LM inputs (ids >= BIDIRECTIONAL),
    shared prefixes (negative ids)."""
    alibi: bool = True
    """ALiBi's distance penalty (model.position_embedding=alibi)."""
    blocks: bool = False
    """Works in blocks of model.sparse.block_size tokens (the sequence and a prefix a multiple of it)."""
    hf_twin: bool = False
    """transformers computes it exactly (export writes a model that computes ours)."""


class AttentionKernel:
    """One model.attention choice. Subclass it, set `name` and `supports`, implement `module`."""

    name: ClassVar[str] = ""
    supports: ClassVar[Capabilities] = Capabilities()

    @classmethod
    def module(cls, m) -> tuple[type, dict]:
        """(core_attention module class, its keyword arguments) for a ModelConfig `m`."""
        raise NotImplementedError

    @classmethod
    def check(cls, m) -> None:
        """Raise UnsupportedAttention (its text said as a config error) when `m` does not fit the kernel."""

    @classmethod
    def check_start(cls, gpus: int, where: str) -> None:
        """Before the launcher starts anything: what it needs of the machine (gpus: GPUs per node, `where` says
        why there are none)."""

    @classmethod
    def check_build(cls, device, dtype) -> str | None:
        """At model build: why it cannot run on this device and dtype, said after `model.attention=<name>`, with
        what to do instead (None: it can)."""
        return None


def missing(kernel: type[AttentionKernel], capability: str, m) -> str:
    """'model.attention=learned does not support kv_cache (Decoding with a KV cache ...)'."""
    doc = {"dropout": "attention dropout", "kv_cache": "decoding with a KV cache",
           "prompt_tuning": "prompt tuning's virtual tokens", "prefix_tuning": "prefix tuning's keys and values",
           "segments": "segment ids (packed documents, prefix-LM inputs)", "alibi": "ALiBi",
           "blocks": "block sizes", "hf_twin": "an exact transformers twin"}.get(capability, capability)
    return f"model.attention={m.attention} does not support {capability} ({doc})"


class Dense(AttentionKernel):
    """flash-attn on GPU when installed, else SDPA (dense.py)."""

    name = "dense"
    supports = Capabilities(dropout=True, kv_cache=True, prompt_tuning=True, hf_twin=True)

    @classmethod
    def module(cls, m):
        from gorilla_dist.kernels.dense import DenseAttention

        return DenseAttention, {"require_flash": False, "alibi": m.position_embedding == "alibi"}


class Flash(Dense):
    """flash-attn, and an error instead of a fallback (dense.py)."""

    name = "flash"

    @classmethod
    def module(cls, m):
        kind, kwargs = super().module(m)
        return kind, {**kwargs, "require_flash": True}

    @classmethod
    def check_start(cls, gpus: int, where: str) -> None:
        import importlib.util

        if importlib.util.find_spec("flash_attn") is None:
            raise UnsupportedAttention("model.attention=flash needs the flash-attn package (pip install -e '.[gpu]' on "
                                       "a CUDA machine); model.attention=dense uses flash-attn when it can and SDPA "
                                       "otherwise")
        if not gpus:
            raise UnsupportedAttention(f"model.attention=flash needs a GPU and {where}; model.attention=dense runs "
                                       "SDPA here")

    @classmethod
    def check_build(cls, device, dtype) -> str | None:
        from gorilla_dist.kernels.dense import flash_unusable

        reason = flash_unusable(device, dtype)
        return reason and f"{reason}; model.attention=dense uses flash-attn when it can and SDPA otherwise"


class BlockSparse(AttentionKernel):
    """The block-sparse layouts: Triton on CUDA (block_sparse.py), block-gather on CPU (block_gather.py)."""

    supports = Capabilities(kv_cache=True, blocks=True)

    @classmethod
    def check(cls, m) -> None:
        sp, bs = m.sparse, m.sparse.block_size
        if bs not in BLOCK_SIZES:
            raise UnsupportedAttention(f"model.sparse.block_size={bs!r} is not valid; choose one of: "
                                       f"{', '.join(map(str, BLOCK_SIZES))}")
        if m.seq_length % bs:
            raise UnsupportedAttention(f"model.seq_length({m.seq_length}) is not a multiple of model.sparse.block_size"
                                       f"({bs}), which model.attention={m.attention} needs")
        for key in ("window", "stride"):
            if getattr(sp, key) <= 0:
                raise UnsupportedAttention(f"model.sparse.{key}={getattr(sp, key)} must be > 0")
        for key in ("global_blocks", "random_blocks"):
            if getattr(sp, key) < 0:
                raise UnsupportedAttention(f"model.sparse.{key}={getattr(sp, key)} must be >= 0")
        forced = 2 if sp.keep_first else 1  # own block (+ first block): topk must leave room for them
        if sp.topk < forced:
            raise UnsupportedAttention(f"model.sparse.topk={sp.topk} must be >= {forced} (model.sparse.keep_first="
                                       f"{sp.keep_first})")

    @classmethod
    def common(cls, m) -> dict:
        return {"block_size": m.sparse.block_size, "alibi": m.position_embedding == "alibi"}


class Static(BlockSparse):
    """A static block-sparse layout (sparse_attention.py, layouts.py)."""

    @classmethod
    def sizes(cls, sp) -> dict:
        raise NotImplementedError

    @classmethod
    def module(cls, m):
        from gorilla_dist.kernels.sparse_attention import StaticSparseAttention

        return StaticSparseAttention, {**cls.common(m), "kind": cls.name, **cls.sizes(m.sparse)}


class Sliding(Static):
    name = "sliding"

    @classmethod
    def sizes(cls, sp) -> dict:
        return {"window": sp.window}


class Strided(Static):
    name = "strided"

    @classmethod
    def sizes(cls, sp) -> dict:
        return {"stride": sp.stride, "window": sp.window}


class BigBird(Static):
    name = "bigbird"

    @classmethod
    def sizes(cls, sp) -> dict:
        return {"global_blocks": sp.global_blocks, "window": sp.window, "random_blocks": sp.random_blocks,
                "seed": sp.seed}


class Learned(BlockSparse):
    """Learned top-k block selection (sparse_attention.py)."""

    name = "learned"
    # a block's keys are chosen from all of its queries, which a cache cannot reproduce
    supports = Capabilities(kv_cache=False, blocks=True)

    @classmethod
    def module(cls, m):
        from gorilla_dist.kernels.sparse_attention import LearnedSparseAttention

        return LearnedSparseAttention, {**cls.common(m), "topk": m.sparse.topk, "keep_first": m.sparse.keep_first}


class Registry:
    """Plug-ins of one kind by name: the built-in ones, those registered in this process, and those installed
    packages declare as entry points of `group` (loaded when first asked for). Attention kernels use it, and
    so do the pretraining objectives (gorilla_dist/objectives)."""

    def __init__(self, base: type, group: str, built_in: dict, error: type[Exception] = UnsupportedAttention):
        """built_in: {name: class, or (module, attribute) imported on first use}; error: raised for a name
        nothing provides."""
        self.base, self.group, self.built_in, self.error = base, group, dict(built_in), error
        self.registered: dict[str, type] = {}

    def register(self, cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, self.base)) or not cls.name:
            raise TypeError(f"{cls!r}: a plug-in here is a subclass of {self.base.__module__}.{self.base.__name__} "
                            "with a name")
        self.registered[cls.name] = cls
        return cls

    def entry_points(self) -> dict:
        from importlib.metadata import entry_points

        return {ep.name: ep for ep in entry_points(group=self.group)}

    def names(self) -> list[str]:
        return list(dict.fromkeys([*self.built_in, *self.registered, *self.entry_points()]))

    def get(self, name: str, key: str):
        """The plug-in called `name`, or `error` naming `key` (the config key that names it) and the choices."""
        if name in self.registered:
            return self.registered[name]
        if name in self.built_in:
            found = self.built_in[name]
            if isinstance(found, tuple):
                import importlib

                found = getattr(importlib.import_module(found[0]), found[1])
            return self.register(found)
        ep = self.entry_points().get(name)
        if ep is None:
            raise self.error(f"{key}={name!r} is not valid; choose one of: {', '.join(self.names())}")
        cls = ep.load()
        if not (isinstance(cls, type) and issubclass(cls, self.base)) or cls.name != name:
            raise self.error(f"{key}={name}: the entry point {ep.value} ({self.group}) is not a {self.base.__name__} "
                             f"subclass named {name!r}")
        return self.register(cls)


KERNELS = Registry(AttentionKernel, ENTRY_POINTS,
                   {k.name: k for k in (Dense, Flash, Sliding, Strided, BigBird, Learned)})


def register_attention(cls: type[AttentionKernel]) -> type[AttentionKernel]:
    """Make `cls` available as model.attention=<cls.name> in this process (usable as a decorator)."""
    return KERNELS.register(cls)


def attention_kernel(name: str) -> type[AttentionKernel]:
    """The kernel called `name`; UnsupportedAttention naming the choices when there is none."""
    return KERNELS.get(name, "model.attention")
