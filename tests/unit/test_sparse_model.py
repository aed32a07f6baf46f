"""Sparse attention inside the megatron-core model: the core_attention swap, ALiBi, the learned
layout's training signal, and the config checks."""

import pytest
import torch
from helpers import composed
from omegaconf import OmegaConf

from gorilla_dist.config import ModelConfig, validate
from gorilla_dist.errors import ConfigError
from gorilla_dist.kernels import DenseAttention, LearnedSparseAttention, StaticSparseAttention
from gorilla_dist.kernels.alibi import alibi_mask, alibi_slopes
from gorilla_dist.kernels.limits import BIDIRECTIONAL
from gorilla_dist.model import build_model


def model_cfg(**kw):
    base = dict(name="t", num_layers=2, hidden_size=64, num_heads=4, seq_length=64,
                sparse=dict(block_size=16))
    return OmegaConf.merge(OmegaConf.structured(ModelConfig), {**base, **kw})


def per_token_loss(m, world, x, segments=None):
    model = build_model(m, vocab_size=50, dtype="fp32", device=world.device, seed=3)
    pos = torch.arange(x.shape[1]).expand_as(x)
    return model, model(x, pos, segments, labels=x.roll(-1, 1))


def prefix_lm_segments():
    """(2, 64) segment ids: sample 0 = doc 0 with its input over two blocks, then doc 1 (input, target);
    sample 1 = one document whose input is the first three blocks (gorilla_dist/kernels/limits.BIDIRECTIONAL)."""
    B = BIDIRECTIONAL
    runs = [[(B, 21), (0, 9), (B + 1, 4), (1, 30)], [(B, 40), (0, 24)]]
    return torch.tensor([[i for i, n in row for _ in range(n)] for row in runs], dtype=torch.int32)


def core_attention(model):
    return model.decoder.layers[0].self_attention.core_attention


@pytest.mark.parametrize("segments", [False, True], ids=["causal", "prefix-lm"])
@pytest.mark.parametrize("position", ["rope", "alibi"])
def test_full_window_sparse_equals_dense(world1, position, segments):
    """A sliding window covering every block is dense causal attention: the swapped core_attention
    must give the dense model's losses, forward and backward; with prefix-LM segment ids too (inputs
    bidirectional, across blocks)."""
    x = torch.randint(0, 50, (2, 64), generator=torch.Generator().manual_seed(0))
    seg = prefix_lm_segments() if segments else None
    dense_model, dense = per_token_loss(model_cfg(position_embedding=position), world1, x, seg)
    sparse_model, sparse = per_token_loss(
        model_cfg(position_embedding=position, attention="sliding", sparse=dict(block_size=16, window=4)), world1, x,
        seg)
    assert isinstance(core_attention(dense_model), DenseAttention)
    assert isinstance(core_attention(sparse_model), StaticSparseAttention)
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-5)
    dense.mean().backward()
    sparse.mean().backward()
    name = "decoder.layers.0.self_attention.linear_qkv.weight"
    g_dense, g_sparse = (dict(mod.named_parameters())[name].grad for mod in (dense_model, sparse_model))
    torch.testing.assert_close(g_sparse, g_dense, rtol=1e-4, atol=1e-6)
    # and a narrower window is a different model
    _, narrow = per_token_loss(model_cfg(position_embedding=position, attention="sliding",
                                         sparse=dict(block_size=16, window=1)), world1, x, seg)
    assert (narrow - dense).abs().max() > 1e-3
    if segments:  # and the segments matter
        assert (per_token_loss(model_cfg(position_embedding=position), world1, x)[1] - dense).abs().max() > 1e-3


def test_learned_layout_with_prefix_lm_segments(world1):
    """The learned layout under segment ids: its selection is causal, the mirrored blocks carry the inputs
    ahead, and the gate still gets a gradient."""
    m = model_cfg(attention="learned", position_embedding="alibi", sparse=dict(block_size=16, topk=3))
    x = torch.randint(0, 50, (2, 64), generator=torch.Generator().manual_seed(0))
    model, loss = per_token_loss(m, world1, x, prefix_lm_segments())
    attn = core_attention(model)
    assert attn.last_layout.kv_num_blocks.max() <= 3  # the selection itself stays top-3 (2 forced)
    loss.mean().backward()
    assert attn.score_delta.grad.abs().sum() > 0 and torch.isfinite(loss).all()
    _, causal = per_token_loss(m, world1, x)
    assert (causal - loss).abs().max() > 1e-3


@pytest.mark.parametrize("attention", ["bigbird", "learned"])
def test_any_length_is_padded_to_whole_blocks(world1, attention):
    """Sampling runs the model at every length: a length that is not a whole number of blocks is
    padded at the end, which (causal) leaves the outputs of the real positions as they would be."""
    m = model_cfg(attention=attention, sparse=dict(block_size=16, window=1, random_blocks=1, topk=2))
    model = build_model(m, vocab_size=50, dtype="fp32", device=world1.device, seed=3).eval()
    x = torch.randint(0, 50, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(x, torch.arange(48)[None], None)
        short = model(x[:, :40], torch.arange(40)[None], None)
    if attention == "bigbird":  # a fixed layout: exactly the first 40 positions of the longer run
        torch.testing.assert_close(short, full[:, :40], rtol=1e-5, atol=1e-5)
    else:  # learned: the last block's pooled query differs, so only the first two blocks must agree
        torch.testing.assert_close(short[:, :32], full[:, :32], rtol=1e-5, atol=1e-5)
    assert short.shape == (1, 40, 128)


def test_alibi_slopes():
    assert alibi_slopes(8).tolist() == [2.0 ** -i for i in range(1, 9)]
    # not a power of two: the 4-head sequence, then every other slope of the 8-head one
    assert alibi_slopes(6).tolist() == [2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8, 2.0 ** -1, 2.0 ** -3]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_alibi_distances_are_fp32_and_cast_once(dtype):
    """The SDPA paths' ALiBi mask equals the fp32 penalty rounded once to the attention's dtype, as flash-attn
    (fp32 slopes) and the block-sparse kernels compute it; bf16 distances would already round above 256
    (257 -> 256), so a 600-token window would differ from the flash path on the same batch."""
    slopes = alibi_slopes(12)  # (not a power of two: slopes 2^-0.5, 2^-1.5, ... that round)
    mask = alibi_mask(slopes, 2, 600, None, dtype)
    dist = (torch.arange(598, 600)[:, None] - torch.arange(600)).float()
    reference = (-slopes.view(1, -1, 1, 1) * dist).to(dtype).masked_fill(dist < 0, float("-inf"))
    assert mask.dtype == dtype and torch.equal(mask, reference)
    assert dtype == torch.float16 or not torch.equal(mask, (-slopes.to(dtype).view(1, -1, 1, 1) * dist.to(dtype)).masked_fill(dist < 0,
                                                                                                    float("-inf")))


def test_alibi_changes_the_model_and_has_no_position_embedding(world1):
    x = torch.randint(0, 50, (2, 64), generator=torch.Generator().manual_seed(0))
    alibi_model, alibi = per_token_loss(model_cfg(position_embedding="alibi"), world1, x)
    _, rope = per_token_loss(model_cfg(position_embedding="rope"), world1, x)
    assert getattr(alibi_model, "rotary_pos_emb", None) is None and not hasattr(alibi_model.embedding, "position_embeddings")
    assert (alibi - rope).abs().max() > 1e-3


def test_learned_layout_trains_its_selection(world1):
    """Gradients reach the scoring parameters, and a short training run changes which blocks are kept."""
    torch.manual_seed(0)
    m = model_cfg(attention="learned", sparse=dict(block_size=16, topk=2, keep_first=False), num_layers=1)
    model = build_model(m, vocab_size=50, dtype="fp32", device=world1.device, seed=3)
    attn = core_attention(model)
    assert isinstance(attn, LearnedSparseAttention)
    g = torch.Generator().manual_seed(1)
    # a task that rewards looking far back: the target is the token 40 positions earlier
    x = torch.randint(0, 50, (8, 64), generator=g)
    y = x.roll(40, 1)
    pos = torch.arange(64).expand_as(x)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def step():
        opt.zero_grad()
        loss = model(x, pos, None, labels=y).mean()
        loss.backward()
        opt.step()
        return loss.item()

    first = step()
    chosen_before = attn.last_layout.kv_indices.clone()
    assert attn.score_delta.grad.abs().sum() > 0 and attn.score_bias.grad.abs().sum() > 0
    for _ in range(60):
        last = step()
    step()
    assert last < first
    assert not torch.equal(attn.last_layout.kv_indices, chosen_before), "the selection never changed"
    # every query block keeps its own block and exactly topk blocks where that many exist
    num = attn.last_layout.kv_num_blocks
    assert num.tolist() == [[[1, 2, 2, 2]] * 4] * 8


@pytest.mark.parametrize("overrides, message", [
    (["model.attention=sliding", "model.sparse.block_size=48"], "model.sparse.block_size=48"),
    (["model.attention=learned", "model.seq_length=80", "model.sparse.block_size=32"],
     "model.seq_length(80) is not a multiple of model.sparse.block_size(32)"),
    (["model.attention=bigbird", "model.dropout=0.1"], "model.dropout=0.1"),
    (["model.attention=learned", "model.sparse.topk=1"], "model.sparse.topk=1 must be >= 2"),
    (["model.attention=sparse"], "model.attention='sparse' is not valid"),
])
def test_sparse_config_errors(overrides, message):
    cfg = composed("model.seq_length=128", *overrides)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate(cfg)


def test_flash_without_flash_attn_is_a_config_error(world1, monkeypatch):
    from gorilla_dist.kernels import dense

    monkeypatch.setattr(dense, "flash_attn_func", None)  # as on a machine without the gpu extra
    with pytest.raises(ConfigError, match="model.attention=flash needs the flash-attn package"):
        build_model(model_cfg(attention="flash"), vocab_size=50, dtype="fp32", device=world1.device, seed=0)


def test_flash_falls_back_to_sdpa_for_segment_ids_and_says_so_once(world1, monkeypatch, capsys):
    """flash-attn cannot express prefix-LM (or per-document) masks: model.attention=flash runs those batches
    on SDPA (the dense model's numbers) and says so once. (flash-attn stands in as a function that must not
    be called: this CPU cannot run it.)"""
    from gorilla_dist.kernels import dense

    def no_flash(*args, **kwargs):
        raise AssertionError("flash-attn called for a masked batch")

    monkeypatch.setattr(dense, "flash_attn_func", no_flash)
    monkeypatch.setattr(dense, "_use_flash", lambda q: True)
    monkeypatch.setattr(dense, "flash_unusable", lambda device, dtype: None)
    monkeypatch.setattr(dense, "_SAID", set())
    x, seg = torch.randint(0, 50, (2, 64), generator=torch.Generator().manual_seed(0)), prefix_lm_segments()
    flash = [per_token_loss(model_cfg(attention="flash"), world1, x, seg)[1] for _ in range(2)]
    _, want = per_token_loss(model_cfg(), world1, x, seg)
    torch.testing.assert_close(flash[0], want, rtol=1e-6, atol=1e-6)
    assert capsys.readouterr().err.count("flash-attn has no mask for prefix-LM inputs or shared prefixes") == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the Triton path inside the model")
@pytest.mark.parametrize("attention", ["bigbird", "learned"])
def test_triton_path_in_the_model_matches_the_cpu_path(world1, attention):
    """The same model on CUDA (Triton kernels) and on CPU (block-gather): same losses and gradients."""
    m = model_cfg(attention=attention, position_embedding="alibi",
                  sparse=dict(block_size=16, window=1, random_blocks=1, topk=2))
    x = torch.randint(0, 50, (2, 64), generator=torch.Generator().manual_seed(0))
    results = []
    for device in ("cpu", "cuda"):
        model = build_model(m, vocab_size=50, dtype="fp32", device=torch.device(device), seed=3)
        xs = x.to(device)
        loss = model(xs, torch.arange(64, device=device).expand_as(xs), None, labels=xs.roll(-1, 1)).mean()
        loss.backward()
        grad = dict(model.named_parameters())["decoder.layers.0.self_attention.linear_qkv.weight"].grad
        results.append((loss.item(), grad.cpu()))
    assert abs(results[0][0] - results[1][0]) < 1e-4
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("attention", ["sliding", "strided", "bigbird", "learned"])
def test_the_debug_model_runs_every_sparse_layout(attention):
    """model=debug (sequence 32) uses blocks of 16, so `model=debug model.attention=<any>` validates."""
    validate(composed("model=debug", f"model.attention={attention}"))
