"""Generation with a KV cache (megatron-core's static inference context) gives the same tokens as
re-running the context at every step, for each position encoding, grouped-query attention, MoE and a
sequence that outgrows model.seq_length (the window then slides, uncached); each cached step runs one
token."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from gorilla_dist.config import ModelConfig
from gorilla_dist.inference import Decoder, sample_ids

MODELS = {
    "rope": {},
    "learned": {"position_embedding": "learned_absolute"},
    "alibi": {"position_embedding": "alibi"},
    "gqa-swiglu": {"num_query_groups": 2, "activation": "swiglu", "normalization": "RMSNorm"},
    "moe": {"moe": {"num_experts": 4, "topk": 2}},
}


@pytest.mark.parametrize("name", MODELS)
def test_cached_greedy_tokens_equal_uncached(world1, name):
    from gorilla_dist.model import build_model

    m = OmegaConf.merge(OmegaConf.structured(ModelConfig), dict(name="t", num_layers=2, hidden_size=64, num_heads=4,
                        seq_length=24, **MODELS[name]))
    model = build_model(m, vocab_size=50, dtype="fp32", device=world1.device, seed=5).eval()
    prompt = torch.randint(0, 50, (1, 7), generator=torch.Generator().manual_seed(1))
    lengths = []
    hook = model.register_forward_pre_hook(lambda _m, args: lengths.append(args[0].shape[1]))
    cached = sample_ids(model, prompt, vocab_size=50, max_new_tokens=30, seq_length=24, temperature=0, cache=True)
    hook.remove()
    plain = sample_ids(model, prompt, vocab_size=50, max_new_tokens=30, seq_length=24, temperature=0, cache=False)
    assert torch.equal(cached, plain) and cached.shape[1] == 37
    # prefill 7 tokens, then one token per step until the sequence outgrows 24, then whole windows
    assert lengths == [7] + [1] * 17 + [24] * 12


def test_cached_logits_equal_uncached_logits(world1):
    from gorilla_dist.model import build_model

    m = OmegaConf.merge(OmegaConf.structured(ModelConfig), dict(name="t", num_layers=2, hidden_size=64, num_heads=4,
                        seq_length=16))
    model = build_model(m, vocab_size=50, dtype="fp32", device=world1.device, seed=5).eval()
    ids = torch.randint(0, 50, (1, 16), generator=torch.Generator().manual_seed(2))
    cached, plain = Decoder(model, 16, cache=True), Decoder(model, 16, cache=False)
    with torch.no_grad():
        for t in range(3, 17):
            torch.testing.assert_close(cached.logits(ids[:, :t]), plain.logits(ids[:, :t]), rtol=1e-5, atol=1e-5)
