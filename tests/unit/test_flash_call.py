"""Our call of flash-attn (FA2's `flash_attn_func`), checked on CPU against its documented contract by a stub
that asserts what we pass — (batch, seq, heads, head_dim) tensors with a unit last stride, fp16/bf16, key/value
heads dividing the query heads (GQA), fp32 ALiBi slopes (heads,), the softmax scale, causal — and computes
flash-attn's function in fp32 (causal aligned to the bottom right, as FA2 >= 2.1 does). DenseAttention through
the stub must equal DenseAttention through SDPA on the same inputs: the transposes, the flags and the slopes
around the call are ours to get right. The real kernel runs in the GPU-marked tests."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType

from gorilla_dist.kernels import dense
from gorilla_dist.kernels.alibi import alibi_mask
from test_sparse_model import prefix_lm_segments

S, B, H, D = 40, 2, 4, 16


def flash_stub(calls):
    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                        softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
        assert q.dim() == k.dim() == v.dim() == 4 and q.shape[0] == B and q.shape[1] == S  # (b, s, h, d)
        assert all(t.stride(-1) == 1 for t in (q, k, v)), "flash-attn needs the last dimension contiguous"
        assert q.dtype in (torch.float16, torch.bfloat16) and k.dtype == v.dtype == q.dtype
        assert q.shape[2] % k.shape[2] == 0 and k.shape == v.shape and k.shape[-1] == q.shape[-1]
        assert alibi_slopes is None or (alibi_slopes.dtype == torch.float32 and alibi_slopes.shape == (q.shape[2],))
        assert isinstance(softmax_scale, float) and dropout_p == 0.0 and window_size == (-1, -1)
        calls.append({"causal": causal, "alibi": alibi_slopes is not None, "gqa": k.shape[2] < q.shape[2]})
        qf, kf, vf = (t.float().transpose(1, 2) for t in (q, k, v))  # (b, h, s, d)
        rep = qf.shape[1] // kf.shape[1]
        kf, vf = kf.repeat_interleave(rep, 1), vf.repeat_interleave(rep, 1)
        s, t = qf.shape[2], kf.shape[2]
        allowed = torch.ones(s, t, dtype=torch.bool).tril(t - s) if causal else torch.ones(s, t, dtype=torch.bool)
        mask = (alibi_mask(alibi_slopes, s, t, allowed, torch.float32) if alibi_slopes is not None
                else torch.zeros(s, t).masked_fill(~allowed, float("-inf")))
        out = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=mask, scale=softmax_scale)
        return out.transpose(1, 2).to(q.dtype)
    return flash_attn_func


@pytest.mark.parametrize("groups,alibi", [(4, False), (2, False), (4, True), (1, True)])
def test_our_flash_call_equals_our_sdpa_path(world1, monkeypatch, groups, alibi):
    config = SimpleNamespace(attention_dropout=0.0, kv_channels=D, num_attention_heads=H)
    attn = dense.DenseAttention(config, 1, AttnMaskType.causal, "self", alibi=alibi).eval()
    g = torch.Generator().manual_seed(groups)
    q = torch.randn(S, B, H, D, generator=g).bfloat16()  # megatron's [s, b, heads, head_dim]
    k, v = (torch.randn(S, B, groups, D, generator=g).bfloat16() for _ in range(2))
    sdpa = attn(q, k, v, None)  # (this CPU: flash-attn is not installed, so SDPA)
    calls = []
    monkeypatch.setattr(dense, "flash_attn_func", flash_stub(calls))
    monkeypatch.setattr(dense, "_use_flash", lambda t: t.dtype in (torch.float16, torch.bfloat16))
    flash = attn(q, k, v, None)
    assert calls == [{"causal": True, "alibi": alibi, "gqa": groups < H}]
    assert flash.shape == sdpa.shape == (S, B, H * D) and flash.dtype == sdpa.dtype
    torch.testing.assert_close(flash.float(), sdpa.float(), atol=2e-2, rtol=2e-2)  # (bf16 rounding: 8 bits)


def varlen_stub(calls):
    """flash-attn's `flash_attn_varlen_func` contract: (total, heads, d) tensors, int32 cumulative lengths
    ending at total (zero-length sequences allowed), max lengths as ints bounding every sequence; computed per
    sequence in fp32 (causal, bottom-right aligned; ALiBi by distance)."""
    def flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None, causal=False,
                               window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                               return_attn_probs=False, block_table=None):
        assert q.dim() == k.dim() == v.dim() == 3 and all(t.stride(-1) == 1 for t in (q, k, v))
        assert q.dtype in (torch.float16, torch.bfloat16) and k.dtype == v.dtype == q.dtype
        assert cu_q.dtype == cu_k.dtype == torch.int32 and cu_q.dim() == 1 and torch.equal(cu_q, cu_k)
        assert int(cu_q[0]) == 0 and int(cu_q[-1]) == q.shape[0] and bool((cu_q[1:] >= cu_q[:-1]).all())
        assert isinstance(max_q, int) and isinstance(max_k, int) and int((cu_q[1:] - cu_q[:-1]).max()) <= max_q
        calls.append({"sequences": len(cu_q) - 1, "empty": int((cu_q[1:] == cu_q[:-1]).sum()), "causal": causal})
        out = torch.zeros_like(q, dtype=torch.float32)
        rep = q.shape[1] // k.shape[1]
        for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
            if a == b:
                continue
            qs, ks, vs = (t[a:b].float().transpose(0, 1)[None] for t in (q, k, v))  # (1, h, n, d)
            ks, vs = ks.repeat_interleave(rep, 1), vs.repeat_interleave(rep, 1)
            n = b - a
            allowed = torch.ones(n, n, dtype=torch.bool).tril() if causal else torch.ones(n, n, dtype=torch.bool)
            mask = (alibi_mask(alibi_slopes, n, n, allowed, torch.float32) if alibi_slopes is not None
                    else torch.zeros(n, n).masked_fill(~allowed, float("-inf")))
            out[a:b] = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=softmax_scale)[0].transpose(0, 1)
        return out.to(q.dtype)
    return flash_attn_varlen_func


def packed_batch(seq: int = 64):
    """Two rows of documents separated by <eod> (id 15): data.loader.pack with reset_at_eod, as training packs."""
    import numpy as np

    from gorilla_dist.data.loader import pack

    rng = np.random.default_rng(0)
    windows = rng.integers(0, 15, (2, seq + 1))
    windows[0, [9, 30, 31, 50]] = 15  # four ends: five documents, one of them a lone <eod>
    windows[1, [40]] = 15
    return pack(windows, np.array([seq + 1, seq + 1]), np.array([0, 0]), eod=15, reset_at_eod=True)


def test_document_lengths_come_with_plain_packed_documents_only():
    from gorilla_dist.data.loader import doc_lengths

    batch = packed_batch()
    assert batch.doc_lengths.tolist() == [[10, 21, 1, 19, 13], [41, 23, 0, 0, 0]]
    assert batch.doc_lengths.sum(1).tolist() == [64, 64] and batch.doc_lengths.dtype == torch.int32
    assert doc_lengths(prefix_lm_segments().numpy()) is None  # prefix-LM inputs: the segment path
    assert doc_lengths(batch.segments.numpy()[:, ::-1].copy()) is None  # out of order
    assert batch[1:].doc_lengths.tolist() == [[41, 23, 0, 0, 0]]  # micro-batches slice it by rows


@pytest.mark.parametrize("position", ["rope", "alibi"])
def test_packed_documents_through_the_varlen_call_equal_the_segment_path(world1, monkeypatch, position):
    """The whole path on CPU: the loss's model call (loss.per_token_loss) passes megatron's packed_seq_params,
    megatron hands it to core_attention, DenseAttention calls the varlen kernel (the stub) with the documents'
    cumulative lengths: the same losses as SDPA with the segment ids' mask, forward and backward."""
    from gorilla_dist.loss import per_token_loss
    from gorilla_dist.model import build_model
    from test_sparse_model import model_cfg

    batch = packed_batch()
    m = model_cfg(position_embedding=position)
    sdpa_model = build_model(m, vocab_size=50, dtype="bf16", device=world1.device, seed=3)
    want = per_token_loss(sdpa_model, batch)  # (this CPU: no flash-attn: SDPA with the segment mask)
    calls = []
    monkeypatch.setattr(dense, "flash_attn_varlen_func", varlen_stub(calls))
    monkeypatch.setattr(dense, "flash_attn_func", flash_stub([]))
    monkeypatch.setattr(dense, "_use_flash", lambda t: t.dtype in (torch.float16, torch.bfloat16))
    monkeypatch.setattr(dense, "_on_gpu", lambda t: True)
    flash_model = build_model(m, vocab_size=50, dtype="bf16", device=world1.device, seed=3)
    got = per_token_loss(flash_model, batch)
    assert calls == [{"sequences": 10, "empty": 3, "causal": True}] * 2  # both layers, b x D slots
    torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=3e-2)
    for model, loss in ((sdpa_model, want), (flash_model, got)):
        (loss.float() * batch.loss_mask).sum().backward()
    g_want, g_got = (dict(mdl.named_parameters())["decoder.layers.0.self_attention.linear_qkv.weight"].grad.float()
                     for mdl in (sdpa_model, flash_model))
    assert torch.nn.functional.cosine_similarity(g_got.flatten(), g_want.flatten(), dim=0) > 0.99
