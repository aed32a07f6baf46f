"""One adapter per Hugging Face transformers architecture, holding everything that differs between them, both
directions in one place (torchtitan's per-model `state_dict_adapter`):

    llama.py      LlamaForCausalLM (Mistral-shaped too)   rope + RMSNorm + swiglu, grouped-query attention
    gpt_neox.py   GPTNeoXForCausalLM                      rope + LayerNorm + gelu, biases
    gpt2.py       GPT2LMHeadModel                         learned positions + LayerNorm + gelu, biases
    mixtral.py    MixtralForCausalLM                      Llama's attention, softmax top-k experts in every layer
    qwen2_moe.py  Qwen2MoeForCausalLM                     Mixtral's, plus a sigmoid-gated shared expert

An adapter says which transformers `model_type`s it reads, turns a config.json into our ModelConfig's fields
(`fields`, refusing what our model would compute otherwise) and our ModelConfig into a config.json (`config`),
and lists the weight map once (`rules(m)`: each of our tensors, the transformers tensors it becomes and how);
`to_hf` (export) and `from_hf` (checkpoint.init_from=hf:) both read that list, so the two directions cannot
drift apart. Which adapter computes a given model of ours is export.architecture's choice.

A new architecture: a module here with an Adapter subclass, and its entry in ADAPTERS. Torch is imported inside
the weight functions only: the launcher reads configs without it.
"""

from __future__ import annotations

from gorilla_dist.hf.base import TORCH_DTYPE_NAMES, Adapter, Rule, refuse, split_qkv

__all__ = ["TORCH_DTYPE_NAMES", "Adapter", "Rule", "adapter_for", "adapters", "split_qkv"]


def adapters() -> dict[str, Adapter]:
    """Every adapter by the model_type it writes."""
    from gorilla_dist.hf.gpt2 import GPT2
    from gorilla_dist.hf.gpt_neox import GPT_NEOX
    from gorilla_dist.hf.llama import LLAMA
    from gorilla_dist.hf.mixtral import MIXTRAL
    from gorilla_dist.hf.qwen2_moe import QWEN2_MOE

    return {a.model_type: a for a in (LLAMA, GPT_NEOX, GPT2, MIXTRAL, QWEN2_MOE)}


def adapter_for(config: dict, source: str) -> Adapter:
    """The adapter that reads config.json's model_type, or the refusal naming the importable ones."""
    kind = config.get("model_type")
    every = adapters()
    for a in every.values():
        if kind == a.model_type or kind in a.reads:
            return a
    names = [n for a in every.values() for n in (a.model_type, *a.reads)]
    refuse(source, f"model_type={kind!r}; importable: {', '.join(names)}")
