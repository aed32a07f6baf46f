"""Prefix tuning: each layer's attention with the learned keys and values in front equals plain attention
over the concatenated keys (computed by hand), for grouped-query attention and ALiBi, with and without
per-document segments; KV-cached generation gives the uncached tokens; the MLP reparametrisation and the
direct prefixes give what the encoder says."""

from __future__ import annotations

import math

import pytest
import torch
from megatron.core.transformer.enums import AttnMaskType
from omegaconf import OmegaConf

from gorilla_dist.config import FinetuneConfig, ModelConfig


def model_with_prefix(world1, projection=0, n=3, **model):
    from gorilla_dist.finetune import apply_finetune
    from gorilla_dist.model import build_model

    m = OmegaConf.merge(OmegaConf.structured(ModelConfig), {**dict(name="t", num_layers=2, hidden_size=64, num_heads=4,
                        seq_length=32), **model})
    f = OmegaConf.merge(OmegaConf.structured(FinetuneConfig), dict(method="prefix", virtual_tokens=n,
                                                                    prefix_projection=projection))
    net = build_model(m, vocab_size=50, dtype="fp32", device=world1.device, seed=3, finetune=f).eval()
    assert f"{n} keys and values per layer" in apply_finetune(net, f)
    return net


@pytest.mark.parametrize("variant", ["mha", "gqa", "alibi", "segments"])
def test_core_attention_with_a_prefix_equals_attention_over_the_concatenated_keys(world1, variant):
    model = model_with_prefix(world1, **({"num_query_groups": 2} if variant == "gqa" else
                                         {"position_embedding": "alibi"} if variant == "alibi" else {}))
    core = model.decoder.layers[1].self_attention.core_attention
    model.prefix.current = model.prefix()
    pk, pv = core.prefix_kv()  # (3, groups, 16)
    s, b, groups = 7, 2, pk.shape[1]
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(s, b, 4, 16, generator=g), torch.randn(s, b, groups, 16, generator=g), torch.randn(
        s, b, groups, 16, generator=g)
    segments = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0]]) if variant == "segments" else None
    out = core(q, k, v, segments, attn_mask_type=AttnMaskType.causal)  # (s, b, 4 * 16)
    # by hand: keys [prefix; k], every query sees the prefix, then causal (and its own document)
    kk = torch.cat([pk[:, None].expand(-1, b, -1, -1), k]).permute(1, 2, 0, 3).repeat_interleave(4 // groups, 1)
    vv = torch.cat([pv[:, None].expand(-1, b, -1, -1), v]).permute(1, 2, 0, 3).repeat_interleave(4 // groups, 1)
    qq = q.permute(1, 2, 0, 3)
    scores = qq @ kk.transpose(-1, -2) / math.sqrt(16)  # (b, 4, s, 3 + s)
    qpos, kpos = torch.arange(3, 3 + s)[:, None], torch.arange(3 + s)[None, :]
    allowed = (kpos < 3) | (kpos <= qpos)
    if segments is not None:
        kseg = torch.cat([torch.full((b, 3), -1), segments], 1)
        allowed = allowed & ((kseg[:, None, :] == segments[:, :, None]) | (kseg[:, None, :] < 0))[:, None]
    if variant == "alibi":
        scores = scores - core.alibi_slopes.view(1, -1, 1, 1) * (qpos - kpos)
    ref = (scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ vv).permute(2, 0, 1, 3).reshape(s, b, 64)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("projection", [0, 16])
def test_prefix_generation_with_a_kv_cache_equals_uncached(world1, projection):
    from gorilla_dist.inference import Decoder

    model = model_with_prefix(world1, projection)
    ids = torch.randint(0, 50, (1, 20), generator=torch.Generator().manual_seed(2))
    cached, plain = Decoder(model, 32, cache=True), Decoder(model, 32, cache=False)
    with torch.no_grad():
        for t in range(4, 21):
            torch.testing.assert_close(cached.logits(ids[:, :t]), plain.logits(ids[:, :t]), rtol=1e-5, atol=1e-5)
        base = model(ids, torch.arange(20)[None], None)
        model.prefix.embedding.zero_()
        assert (model(ids, torch.arange(20)[None], None) - base)[..., :50].abs().max() > 1e-4  # the prefix matters


SPARSE = {"sliding": {"attention": "sliding", "sparse": {"block_size": 16, "window": 2}},
          "bigbird-gqa-alibi": {"attention": "bigbird", "num_query_groups": 2, "position_embedding": "alibi",
                                "sparse": {"block_size": 16, "window": 1, "global_blocks": 1, "random_blocks": 0}},
          "learned": {"attention": "learned", "sparse": {"block_size": 16, "topk": 2}}}


@pytest.mark.parametrize("variant", SPARSE)
def test_block_sparse_attention_with_a_prefix_sees_the_prefix_keys_from_every_query(world1, variant):
    """16 prefix keys (one block) in front of a block-sparse layout: equal to attention by hand over
    [prefix; keys] where every query sees the prefix and, of the tokens, what its layout row allows;
    gradients reach the prefix. Generation with a KV cache (static layouts) equals the uncached logits."""
    from gorilla_dist.inference import Decoder, caches

    model = model_with_prefix(world1, n=16, **{**SPARSE[variant], "seq_length": 64})
    core = model.decoder.layers[1].self_attention.core_attention
    model.prefix.current = model.prefix()
    pk, pv = core.prefix_kv()  # (16, groups, 16)
    s, b, groups = 40, 2, pk.shape[1]  # (padded to 48 tokens: 3 blocks)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(s, b, h, 16, generator=g) for h in (4, groups, groups))
    out = core(q, k, v, None, attn_mask_type=AttnMaskType.causal)
    layout = core.last_layout if variant == "learned" else core.build_layout(48)
    tokens = layout.dense_mask()[..., :s, :s]  # (B|1, 4, s, s)
    allowed = torch.cat([torch.ones(*tokens.shape[:-1], 16, dtype=torch.bool), tokens], -1)
    kk = torch.cat([pk[:, None].expand(-1, b, -1, -1), k]).permute(1, 2, 0, 3).repeat_interleave(4 // groups, 1)
    vv = torch.cat([pv[:, None].expand(-1, b, -1, -1), v]).permute(1, 2, 0, 3).repeat_interleave(4 // groups, 1)
    scores = q.permute(1, 2, 0, 3) @ kk.transpose(-1, -2) / math.sqrt(16)  # (b, 4, s, 16 + s)
    if variant == "bigbird-gqa-alibi":
        qpos, kpos = torch.arange(16, 16 + s)[:, None], torch.arange(16 + s)[None, :]
        scores = scores - core.alibi_slopes.view(1, -1, 1, 1) * (qpos - kpos)
    if variant == "learned":  # the gate on each selected, non-forced block (the prefix has none)
        gate = torch.zeros(b, 4, 3, 3)
        scores_b = core.block_scores(torch.nn.functional.pad(q.permute(1, 2, 0, 3), (0, 0, 0, 8)),
                                     torch.nn.functional.pad(k.permute(1, 2, 0, 3), (0, 0, 0, 8)))
        forced = torch.eye(3, dtype=torch.bool) | (torch.arange(3) == 0)
        gate = torch.where(forced | ~layout.block_mask(), 0.0, torch.nn.functional.logsigmoid(scores_b))
        gate = gate.repeat_interleave(16, -1).repeat_interleave(16, -2)[..., :s, :s]
        scores = scores + torch.cat([torch.zeros(b, 4, s, 16), gate], -1)
    ref = (scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ vv).permute(2, 0, 1, 3).reshape(s, b, 64)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert (tokens.sum(-1) < torch.arange(1, s + 1)).any()  # the layout hides some earlier tokens
    out.square().sum().backward()
    assert model.prefix.embedding.grad.abs().sum() > 0
    ids = torch.randint(0, 50, (1, 64), generator=torch.Generator().manual_seed(2))
    if caches(OmegaConf.create(SPARSE[variant])):
        cached, plain = Decoder(model, 64, cache=True), Decoder(model, 64, cache=False)
        with torch.no_grad():
            for t in range(10, 65, 3):
                torch.testing.assert_close(cached.logits(ids[:, :t]), plain.logits(ids[:, :t]), rtol=1e-5, atol=1e-5)


def test_the_reparametrised_prefix_is_the_mlp_of_the_embedding(world1):
    from gorilla_dist.model.prefix import full_prefix

    model = model_with_prefix(world1, 16)
    weights = {n: p.detach() for n, p in model.named_parameters() if n.startswith("prefix.")}
    assert sorted(weights) == ["prefix.embedding", "prefix.mlp.0.bias", "prefix.mlp.0.weight", "prefix.mlp.2.bias",
                               "prefix.mlp.2.weight"]
    torch.testing.assert_close(full_prefix(weights, (3, 2, 2, 4, 16)), model.prefix().detach())
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(weights)
