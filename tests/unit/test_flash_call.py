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
