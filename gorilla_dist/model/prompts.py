"""Prompt tuning (Lester et al. 2021, finetune.method=prompt): N learned input embeddings, "virtual
tokens", put before every sample's token embeddings; the model is otherwise frozen.

The model's forward is wrapped by a pair of hooks on megatron's GPTModel, so every caller (training's
loss, evaluation, generation) gets it:
  before: the tokens' embeddings (megatron's own embedding module) with the prompt in front, passed as
      megatron's `decoder_input`; the labels get N leading placeholders; segment ids get -1 for the
      virtual tokens, which every document may see (gorilla_dist/kernels/dense.py). Rotary / ALiBi positions run over
      all N + s inputs, virtual tokens first, as in PEFT's prompt tuning on a transformers model. So only
      a sample's first document sees the prompt as at inference: packing several examples per sample is
      refused (train.py), as is data.reset_at_eod (config); per-row rotary positions would lift that.
  after: the first N outputs (the virtual tokens' own) are dropped: callers see one output per token.
With a KV cache (inference.Decoder), only the first call of a sequence (prefill) adds the prompt; the
cache then holds it.
"""

from __future__ import annotations

import torch

from gorilla_dist.engine.state import logical_shape

PROMPT = "soft_prompt"
"""The prompt's module name; its parameter is `soft_prompt.weight`, (N, hidden)."""


class SoftPrompt(torch.nn.Module):
    def __init__(self, n: int, hidden: int, dtype, device):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(n, hidden, dtype=dtype, device=device))


def _before(model, args, kwargs):
    input_ids, position_ids = args[0], args[1]
    attention_mask = args[2] if len(args) > 2 else kwargs.pop("attention_mask", None)
    kwargs.pop("packed_seq_params", None)  # (the virtual tokens lengthen every row: no packed documents)
    context = kwargs.get("inference_context")
    model.prompt_dropped = 0
    if input_ids is None or (context is not None and context.sequence_len_offset > 0):
        return None  # decoding past the prompt: the KV cache holds it
    prompt = model.soft_prompt.weight
    n, b = prompt.shape[0], input_ids.shape[0]
    emb = model.embedding(input_ids=input_ids, position_ids=position_ids)  # (s, b, h)
    kwargs["decoder_input"] = torch.cat([prompt.to(emb.dtype)[:, None, :].expand(n, b, -1), emb])
    if kwargs.get("labels") is not None:
        labels = kwargs["labels"]
        kwargs["labels"] = torch.cat([labels.new_zeros(b, n), labels], dim=1)
    if attention_mask is not None and attention_mask.dtype != torch.bool:  # segment ids (b, s): prompt = -1
        attention_mask = torch.cat([attention_mask.new_full((b, n), -1), attention_mask], dim=1)
    elif attention_mask is not None:
        raise ValueError("prompt tuning takes per-document segment ids, not a megatron (b, 1, s, s) mask")
    model.prompt_dropped = n if context is None else 0  # (prefill logits are the last token's only)
    return (None, None, attention_mask), kwargs


def _after(model, _args, _kwargs, output):
    n = model.prompt_dropped
    return output[:, n:] if n else output  # (b, N + s) losses or (b, N + s, vocab) logits


def attach_soft_prompt(model: torch.nn.Module, n: int) -> None:
    """Add N virtual tokens (zeros until initialised: finetune.prompt_init) and the hooks above."""
    w = model.embedding.word_embeddings.weight
    model.add_module(PROMPT, SoftPrompt(n, logical_shape(w)[1], w.dtype, w.device))
    model.virtual_tokens = n
    model.register_forward_pre_hook(_before, with_kwargs=True)
    model.register_forward_hook(_after, with_kwargs=True)
