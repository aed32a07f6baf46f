"""Dense causal attention as a megatron-core `core_attention` module.

flash-attn on a GPU when it is installed and the inputs are fp16/bf16; PyTorch SDPA otherwise
(SDPA picks its own flash / memory-efficient / math kernel, and runs on CPU).
Constructor and forward follow megatron-core's DotProductAttention so the spec can swap them.
"""

from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType

from gorilla_dist.kernels.base import AttentionModule, with_prefix_columns
from gorilla_dist.kernels.limits import BIDIRECTIONAL, UnsupportedAttention

_FLASH_IMPORT_ERROR = None
try:  # optional GPU extra
    from flash_attn import flash_attn_func, flash_attn_varlen_func
except ImportError as err:  # pragma: no cover - depends on the machine
    flash_attn_func = flash_attn_varlen_func = None
    if getattr(err, "name", None) != "flash_attn":  # installed, but it does not load (e.g. built for another torch)
        _FLASH_IMPORT_ERROR = f"{type(err).__name__}: {err}"


def _use_flash(q: torch.Tensor) -> bool:
    return flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


def flash_unusable(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why flash-attn cannot run here (None: it can, given no per-sample mask)."""
    if flash_attn_func is None and _FLASH_IMPORT_ERROR:
        return (f"flash-attn is installed but does not import ({_FLASH_IMPORT_ERROR[:300]}); it is usually built "
                "against another torch or CUDA: reinstall it with pip install --no-build-isolation flash-attn")
    if flash_attn_func is None:
        return "needs the flash-attn package (pip install -e '.[gpu]' on a CUDA machine)"
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return f"needs CUDA fp16/bf16 tensors for flash-attn; got {device.type} {str(dtype).replace('torch.', '')}"
    return None


def packed_documents(tokens: torch.Tensor, doc_lengths: torch.Tensor | None) -> dict:
    """The model call's extra keyword for a batch of packed plain documents (data.loader.Batch.doc_lengths)
    where flash-attn can run them (document_params); {} elsewhere, so nothing changes on a CPU."""
    if doc_lengths is None or flash_attn_varlen_func is None or not _on_gpu(tokens):
        return {}
    return {"packed_seq_params": document_params(doc_lengths, tokens.shape[1])}


def _on_gpu(t: torch.Tensor) -> bool:
    return t.is_cuda


def document_params(doc_lengths: torch.Tensor, s: int):
    """megatron's PackedSeqParams carrying the documents' cumulative lengths over the flattened (b * s) tokens,
    in megatron's sbhd layout, so megatron changes nothing else (rotary positions over s, as without it);
    DenseAttention then calls flash-attn's varlen kernel instead of SDPA with a (b, 1, s, s) mask. Each row
    has D slots (zero-length ones where it has fewer documents: the kernel returns at once for them), so the
    lengths are never read back to the host."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = F.pad(doc_lengths.flatten().cumsum(0, dtype=torch.int32), (1, 0))  # (b * D + 1,)
    return PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=s, max_seqlen_kv=s)


_SAID: set[str] = set()


def _say_once(message: str) -> None:
    """One line on stderr per process, the first time."""
    if message not in _SAID:
        _SAID.add(message)
        print(message, file=sys.stderr, flush=True)


def attention_reference(q, k, v, *, causal: bool = True, scale: float | None = None, mask=None, bias=None):
    """Plain softmax attention in fp32, for tests. q [b, h, s, d]; k, v [b, h_kv, s, d]; mask: True = keep;
    bias: added to the scores (broadcast to [b, h, s, s]) before masking."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = (q.float() @ k.float().transpose(-1, -2)) * (scale or 1.0 / math.sqrt(q.shape[-1]))
    if bias is not None:
        scores = scores + bias
    s_q, s_k = q.shape[2], k.shape[2]
    if causal:
        mask = torch.ones(s_q, s_k, dtype=torch.bool, device=q.device).tril(s_k - s_q)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v.float()).to(q.dtype)


def sdpa_keep_mask(attention_mask: torch.Tensor | None, s: int) -> torch.Tensor | None:
    """The boolean mask SDPA takes (True = may attend), (b, 1, s, s), from what the model was given:
    None (plain causal: SDPA's is_causal does it), a megatron mask (b, 1, s, s) True where attention is
    NOT allowed, or segment ids (b, s) integer, the document of each token (data.loader.Batch.segments):
    causal and inside the query's document; a negative id marks a shared prefix every document sees
    (prompt tuning's virtual tokens); an id >= BIDIRECTIONAL a prefix-LM input token its whole document
    sees. Built here on the tensors' device, once per layer call; the data loader never builds s x s
    masks."""
    if attention_mask is None:
        return None
    if attention_mask.dtype == torch.bool:
        return ~attention_mask
    seg = attention_mask  # (b, s)
    bidirectional = seg >= BIDIRECTIONAL
    doc = torch.where(bidirectional, seg - BIDIRECTIONAL, seg)
    causal = torch.ones(s, s, dtype=torch.bool, device=seg.device).tril()
    same = (doc[:, :, None] == doc[:, None, :]) | (seg[:, None, :] < 0)
    return (same & (causal | bidirectional[:, None, :]))[:, None]


class DenseAttention(AttentionModule):
    """`require_flash`: model.attention=flash, which refuses to fall back to SDPA. `alibi`: add ALiBi's
    distance penalty (model.position_embedding=alibi)."""

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None, *, require_flash: bool = False,
                 alibi: bool = False):
        super().__init__(config, softmax_scale=softmax_scale, pg_collection=pg_collection, alibi=alibi)
        self.attn_mask_type = attn_mask_type
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.require_flash = require_flash
        if require_flash and flash_attn_func is None:
            raise UnsupportedAttention(flash_unusable(torch.device("cuda"), torch.bfloat16))
        if _FLASH_IMPORT_ERROR and torch.cuda.is_available():  # model.attention=dense: SDPA, said once
            _say_once(f"[attention] {flash_unusable(torch.device('cuda'), torch.bfloat16)}; attention runs on "
                      "PyTorch SDPA")

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        # query [s, b, np, hn]; key, value [s, b, ng, hn] (ng < np with grouped-query attention)
        if attention_bias is not None:
            raise NotImplementedError("DenseAttention: attention_bias is not supported")
        mask_type = attn_mask_type or self.attn_mask_type
        s, b, np_, hn = query.shape
        dropout = self.dropout_p if self.training else 0.0
        if (packed_seq_params is not None and self.prefix_kv is None and _use_flash(query)
                and attention_mask is not None and attention_mask.shape[-1] == s == packed_seq_params.max_seqlen_q):
            # packed plain documents (packed_documents): flash-attn's varlen kernel over the (b * s) tokens
            q, k, v = (t.transpose(0, 1).reshape(b * s, t.shape[2], hn) for t in (query, key, value))
            slopes = None if self.alibi_slopes is None else self.alibi_slopes.float()
            cu = packed_seq_params.cu_seqlens_q
            out = flash_attn_varlen_func(q, k, v, cu, cu, s, s, dropout_p=dropout, softmax_scale=self.softmax_scale,
                                         causal=mask_type == AttnMaskType.causal, alibi_slopes=slopes)
            return out.view(b, s, np_ * hn).transpose(0, 1)  # [s, b, np*hn]
        prefix = self.prefix(b, key.dtype)  # learned keys / values in front, seen by every query (model/prefix.py)
        n_prefix = 0 if prefix is None else prefix[0].shape[2]
        if prefix is not None:
            key, value = (torch.cat([p.permute(2, 0, 1, 3), t]) for p, t in zip(prefix, (key, value)))
        if _use_flash(query) and attention_mask is None:  # (causal aligns to the end: the prefix is visible)
            q, k, v = (t.transpose(0, 1) for t in (query, key, value))  # [b, s, h, hn]
            slopes = None if self.alibi_slopes is None else self.alibi_slopes.float()  # flash-attn wants fp32
            out = flash_attn_func(q, k, v, dropout_p=dropout, softmax_scale=self.softmax_scale,
                                  causal=mask_type == AttnMaskType.causal, alibi_slopes=slopes)
            return out.transpose(0, 1).reshape(s, b, np_ * hn)
        if self.require_flash and attention_mask is not None and attention_mask.dtype != torch.bool \
                and _use_flash(query):
            _say_once("model.attention=flash: flash-attn has no mask for prefix-LM inputs or shared prefixes "
                      "(segment ids other than plain packed documents); those batches run on PyTorch SDPA")
        elif self.require_flash:
            raise UnsupportedAttention(f"flash-attn runs on CUDA fp16/bf16 tensors without a per-sample mask; got "
                                       f"{query.device.type} {query.dtype}"
                                       f"{' with a mask' if attention_mask is not None else ''}")
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, h, s, hn]
        allowed = sdpa_keep_mask(attention_mask, s)
        if n_prefix and (allowed is not None or mask_type == AttnMaskType.causal):
            own = allowed if allowed is not None else torch.ones(s, k.shape[2] - n_prefix, dtype=torch.bool,
                                                                  device=q.device).tril(k.shape[2] - n_prefix - s)
            allowed = with_prefix_columns(own, n_prefix)
        # (more keys than queries when decoding with a KV cache: the queries are the last ones)
        return self.attend(q, k, v, allowed, causal=mask_type == AttnMaskType.causal, dropout=dropout)
