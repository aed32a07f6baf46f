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


SPARSE = {
    "sliding": {"attention": "sliding", "sparse": {"block_size": 16, "window": 2}},
    "bigbird-alibi-gqa": {"attention": "bigbird", "position_embedding": "alibi", "num_query_groups": 2,
                          "sparse": {"block_size": 16, "window": 1, "global_blocks": 1, "random_blocks": 1}},
}


@pytest.mark.parametrize("name", SPARSE)
def test_static_block_sparse_layouts_decode_from_the_cache_as_the_whole_sequence_runs(world1, name):
    """Each cached step (one query) sees its row of the layout: the logits equal re-running the context
    through the block-sparse kernel (1e-5) at every length, and greedy generation past model.seq_length
    gives the same tokens. A dense model with the same weights gives other logits (the layout matters)."""
    from gorilla_dist.inference import caches
    from gorilla_dist.model import build_model

    m = OmegaConf.merge(OmegaConf.structured(ModelConfig), dict(name="t", num_layers=2, hidden_size=64, num_heads=4,
                        seq_length=64, **SPARSE[name]))
    assert caches(m) and not caches(OmegaConf.merge(m, {"attention": "learned"}))
    model = build_model(m, vocab_size=50, dtype="fp32", device=world1.device, seed=5).eval()
    dense = build_model(OmegaConf.merge(m, {"attention": "dense"}), vocab_size=50, dtype="fp32", device=world1.device,
                        seed=5).eval()
    dense.load_state_dict(model.state_dict(), strict=False)
    ids = torch.randint(0, 50, (1, 64), generator=torch.Generator().manual_seed(2))
    cached, plain, full = Decoder(model, 64, cache=True), Decoder(model, 64, cache=False), Decoder(dense, 64, cache=False)
    with torch.no_grad():
        for t in range(5, 65):
            ours = cached.logits(ids[:, :t])
            torch.testing.assert_close(ours, plain.logits(ids[:, :t]), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(ours, full.logits(ids), atol=1e-3)
    prompt = ids[:, :7]
    a = sample_ids(model, prompt, vocab_size=50, max_new_tokens=62, seq_length=64, temperature=0, cache=True)
    b = sample_ids(model, prompt, vocab_size=50, max_new_tokens=62, seq_length=64, temperature=0, cache=False)
    assert torch.equal(a, b) and a.shape[1] == 69


def test_top_k_keeps_only_the_k_most_likely_tokens(world1):
    """top_k=1 is greedy whatever the temperature; top_k=k draws only among each step's k most likely tokens
    (checked against the full logits of every step); without top_k, sampling leaves those k."""
    from gorilla_dist.model import build_model

    m = OmegaConf.merge(OmegaConf.structured(ModelConfig), dict(name="t", num_layers=2, hidden_size=64, num_heads=4,
                        seq_length=48))
    model = build_model(m, vocab_size=50, dtype="fp32", device=world1.device, seed=5).eval()
    prompt = torch.randint(0, 50, (1, 4), generator=torch.Generator().manual_seed(1))
    kw = dict(vocab_size=50, max_new_tokens=40, seq_length=48, cache=False)
    greedy = sample_ids(model, prompt, temperature=0, **kw)
    assert torch.equal(sample_ids(model, prompt, temperature=5.0, top_k=1, seed=3, **kw), greedy)

    def outside_top(ids, k) -> int:
        """How many sampled tokens were not among their step's k most likely."""
        with torch.no_grad():  # the whole sequence at once, causal: row t - 1 scores the token at t
            logits = model(ids[:, :-1], torch.arange(ids.shape[1] - 1)[None], None)  # (1, t - 1, padded vocab)
        n = 0
        for t in range(prompt.shape[1], ids.shape[1]):
            top = torch.topk(logits[0, t - 1, :50], k).indices
            n += int(ids[0, t] not in top)
        return n

    assert outside_top(sample_ids(model, prompt, temperature=5.0, top_k=3, seed=3, **kw), 3) == 0
    assert outside_top(sample_ids(model, prompt, temperature=5.0, top_k=None, seed=3, **kw), 3) > 0
