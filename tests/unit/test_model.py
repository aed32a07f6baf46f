"""megatron-core GPTModel (our spec, our CPU adaptations) against an independent PyTorch forward."""

import pytest
import torch
from omegaconf import OmegaConf
from reference_gpt import reference_loss

from gorilla_dist.config import ModelConfig
from gorilla_dist.model import build_model, flops_per_token, padded_vocab_size

VARIANTS = {
    "rope-layernorm-gelu-tied": {},
    "learned-rmsnorm-swiglu-gqa-untied": dict(position_embedding="learned_absolute", normalization="RMSNorm",
                                              activation="swiglu", num_query_groups=2, tie_embeddings=False),
}


VOCAB = 50


def model_cfg(**kw):
    base = dict(name="t", num_layers=2, hidden_size=64, num_heads=4, seq_length=16)
    return OmegaConf.merge(OmegaConf.structured(ModelConfig), {**base, **kw})


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_matches_reference(world1, variant):
    m = model_cfg(**VARIANTS[variant])
    model = build_model(m, vocab_size=VOCAB, dtype="fp32", device=world1.device, seed=3).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 50, (3, 16), generator=g)
    y = torch.randint(0, 50, (3, 16), generator=g)
    pos = torch.arange(16).expand(3, 16)
    with torch.no_grad():
        ours = model(x, pos, None, labels=y)  # (b, s) per-token loss
        params = {k: v.detach() for k, v in model.named_parameters()}
        ref = reference_loss(params, m, x, y, VOCAB)
    assert ours.shape == (3, 16)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    # The untrained model is near-uniform over the (real, unpadded) vocabulary: a sanity bound on the scale.
    assert abs(ref.mean().item() - torch.log(torch.tensor(50.0)).item()) < 0.2


def test_init_depends_only_on_seed(world1):
    m = model_cfg()
    a = build_model(m, vocab_size=VOCAB, dtype="fp32", device=world1.device, seed=5)
    b = build_model(m, vocab_size=VOCAB, dtype="fp32", device=world1.device, seed=5)
    c = build_model(m, vocab_size=VOCAB, dtype="fp32", device=world1.device, seed=6)
    pa, pb, pc = (dict(x.named_parameters()) for x in (a, b, c))
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert not torch.equal(pa["decoder.layers.0.mlp.linear_fc1.weight"], pc["decoder.layers.0.mlp.linear_fc1.weight"])


def test_padded_vocab_and_flops():
    assert [padded_vocab_size(v) for v in (1, 65, 128, 129, 50257)] == [128, 128, 128, 256, 50304]
    # tiny (nanoGPT shakespeare-char): 4 layers x (3h^2 + h^2 + 8h^2) + h * 128 matmul parameters
    m = model_cfg(num_layers=4, hidden_size=128, seq_length=64)
    params = 4 * 12 * 128 * 128 + 128 * 128
    assert flops_per_token(m, 65) == 6 * params + 12 * 4 * 128 * 64
