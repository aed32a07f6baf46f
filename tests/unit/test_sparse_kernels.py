"""Block-sparse attention kernels against the dense reference (the layout expanded to a token mask):
the CPU block-gather path everywhere, the Triton kernels under TRITON_INTERPRET=1 on CPU (set in
conftest) or for real on a GPU. Forward output and the gradients of q, k, v and the tile bias."""

import pytest
import torch

from gorilla_dist.kernels import layouts as L
from gorilla_dist.kernels.alibi import alibi_mask, alibi_slopes
from gorilla_dist.kernels.block_gather import block_gather_attention
from gorilla_dist.kernels.block_sparse import block_sparse_reference, triton_block_sparse_attention
from gorilla_dist.kernels.dense import sdpa_keep_mask
from gorilla_dist.kernels.limits import BIDIRECTIONAL

S, BS = 64, 16  # 4 query blocks: tiny, because the Triton interpreter runs every program in Python

LAYOUTS = {
    "causal": lambda h: L.causal(S, BS),
    "sliding-single-block": lambda h: L.sliding(S, BS, 1),
    "strided": lambda h: L.strided(S, BS, stride=2),
    "bigbird": lambda h: L.bigbird(S, BS, num_heads=h, global_blocks=1, window=1, random_blocks=1, seed=3),
    "ragged-lists": lambda h: L.from_lists([[0], [1], [0, 1, 2], [1, 3]], S, BS),
    "topk-per-head": lambda h: L.BlockLayout(*L.topk(torch.randn(2, h, 4, 4, generator=torch.Generator().manual_seed(0)), 2), BS),
}


def inputs(*, B=2, H=4, H_kv=2, D=64, dtype=torch.float32, bias_shape=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, S, D, generator=g).to(dtype) for h in (H, H_kv, H_kv))
    bias = None if bias_shape is None else torch.randn(*bias_shape, generator=g)
    return q, k, v, bias


def run(fn, q, k, v, layout, bias=None, slopes=None, device="cpu", segments=None):
    """Output and gradients (q, k, v, bias) of sum(out * w) for a fixed random w."""
    leaves = [t.detach().to(device).requires_grad_() if t is not None else None for t in (q, k, v, bias)]
    extra = {} if segments is None else {"segments": segments.to(device)}
    out = fn(*leaves[:3], layout.to(device), scale=0.125, block_bias=leaves[3],
             alibi_slopes=None if slopes is None else slopes.to(device), **extra)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device)
    grads = torch.autograd.grad((out.float() * w).sum(), [t for t in leaves if t is not None])
    return [out.float().cpu()] + [g.float().cpu() for g in grads]


@pytest.fixture(params=["kept", "recomputed"])
def memory(request, monkeypatch):
    """Both backward paths of block-gather: the forward keeps its probabilities and strips (the budget
    allows), or keeps nothing and the backward recomputes them (KEEP_BYTES = 0)."""
    if request.param == "recomputed":
        monkeypatch.setattr("gorilla_dist.kernels.block_gather.KEEP_BYTES", 0)
    return request.param


def assert_all_close(got, want, tol, *, scaled=False):
    """Elementwise within tol; `scaled` (half precision): within tol * the tensor's largest magnitude,
    since the tile-bias gradient sums hundreds of rounded terms."""
    for name, a, b in zip(["out", "dq", "dk", "dv", "dbias"], got, want):
        if scaled:
            err, size = (a - b).abs().max().item(), b.abs().max().item()
            assert err <= tol * size, f"{name}: max error {err:.3g} > {tol} * max |value| {size:.3g}"
        else:
            torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("options", ["plain", "alibi+bias"])
@pytest.mark.parametrize("kind", LAYOUTS)
def test_block_gather_matches_reference(kind, options, memory):
    H = 4
    layout = LAYOUTS[kind](H)
    bias_shape = (2, H, 4, layout.max_kv) if options != "plain" else None
    slopes = alibi_slopes(H) if options != "plain" else None
    q, k, v, bias = inputs(H=H, bias_shape=bias_shape)
    assert_all_close(run(block_gather_attention, q, k, v, layout, bias, slopes),
                     run(block_sparse_reference, q, k, v, layout, bias, slopes), 1e-5)


def test_block_gather_bf16_and_broadcast_bias(memory):
    layout = LAYOUTS["bigbird"](4)
    q, k, v, bias = inputs(dtype=torch.bfloat16, bias_shape=(1, 4, 4, layout.max_kv))
    got = run(block_gather_attention, q, k, v, layout, bias)
    want = run(block_sparse_reference, q.float(), k.float(), v.float(), layout, bias)
    assert_all_close(got, want, 2e-2, scaled=True)


def test_block_gather_uses_only_listed_blocks():
    """Keys outside the layout cannot influence the output: change them and nothing moves."""
    layout = L.sliding(S, BS, 1)
    q, k, v, _ = inputs()
    k2, v2 = k.clone(), v.clone()
    k2[:, :, :BS], v2[:, :, :BS] = 100.0, -100.0  # block 0 is visited only by query block 0
    a = block_gather_attention(q, k, v, layout, scale=0.125)
    b = block_gather_attention(q, k2, v2, layout, scale=0.125)
    assert torch.equal(a[:, :, BS:], b[:, :, BS:]) and not torch.equal(a[:, :, :BS], b[:, :, :BS])


RAGGED_S, RAGGED_BS = 256, 16  # 16 query blocks: rows of very different length
RAGGED = {  # layouts whose rows differ in length, so padding every row to the longest would cost
    "strided": lambda: L.strided(RAGGED_S, RAGGED_BS, stride=4),
    "growing-fraction": lambda: L.from_lists(  # a third of each row's past, spread over it
        [sorted({round(i * m / max(1, (m + 1) // 3)) for i in range((m + 1) // 3)} | {m}) for m in range(16)],
        RAGGED_S, RAGGED_BS),
    "one-very-long-row": lambda: L.from_lists([[m] for m in range(15)] + [list(range(16))], RAGGED_S, RAGGED_BS),
}


@pytest.mark.parametrize("kind", RAGGED)
def test_block_gather_work_is_the_kept_blocks_for_ragged_lists(kind, memory, monkeypatch):
    """Rows of different length: the result equals the dense reference (with ALiBi and a tile bias, the
    terms that depend on the slot), and the tiles computed are the kept blocks, not n * max_kv. The
    scores are computed once per chunk when the forward keeps its probabilities, twice when not."""
    from gorilla_dist.kernels.block_gather import _Units

    calls, scores = [], _Units.scores  # tiles scored, per call

    def counted(self, ch, *args):
        calls.append(ch.ids.numel() * ch.k)
        return scores(self, ch, *args)
    monkeypatch.setattr(_Units, "scores", counted)

    B, H, H_kv = 2, 4, 2
    layout = RAGGED[kind]()
    n, kmax = layout.n_blocks, layout.max_kv
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, h, RAGGED_S, 32, generator=g) for h in (H, H_kv, H_kv))
    bias, slopes = torch.randn(B, H, n, kmax, generator=g), alibi_slopes(H)

    def go(fn):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, bias)]
        out = fn(*leaves[:3], layout, scale=0.2, alibi_slopes=slopes, block_bias=leaves[3])
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        return [out, *torch.autograd.grad((out * w).sum(), leaves)]

    assert_all_close(go(block_gather_attention), go(block_sparse_reference), 1e-5)
    kept = int(layout.kv_num_blocks.expand(B, H, n).sum())
    units = _Units(layout, B, H, H_kv, "cpu", slopes, bias)
    assert units.tiles == kept, f"{units.tiles} tiles computed for {kept} kept blocks"
    assert sum(calls) == kept * (1 if memory == "kept" else 2)
    assert kept < 0.75 * B * H * n * kmax  # the layout is ragged enough for padding to show


def test_dispatch_takes_block_gather_for_cpu_tensors_and_odd_head_dims():
    from gorilla_dist.kernels.block_sparse import block_sparse_attention

    layout = LAYOUTS["strided"](4)
    q, k, v, _ = inputs(D=48)  # not a power of two: the Triton kernel's tiles cannot hold it
    got = block_sparse_attention(q, k, v, layout, scale=0.125)
    torch.testing.assert_close(got, block_sparse_reference(q, k, v, layout, scale=0.125), rtol=1e-5, atol=1e-5)


# ---- segment ids: documents and prefix-LM inputs (BIDIRECTIONAL) -----------------------------------
def segments_example() -> torch.Tensor:
    """(2, 64): sample 0 = doc 0 (input 0..20 over two blocks, target 21..29), doc 1 (input 30..33, target
    34..50), doc 2 without input (51..63); sample 1 = a shared id (-1) 0..3, doc 0 all input 4..40 (three
    blocks), doc 1 (input 41..44, target 45..63)."""
    B = BIDIRECTIONAL
    runs = [[(B + 0, 21), (0, 9), (B + 1, 4), (1, 17), (2, 13)], [(-1, 4), (B + 0, 37), (B + 1, 4), (1, 19)]]
    return torch.tensor([[i for i, n in row for _ in range(n)] for row in runs], dtype=torch.int32)


def test_with_segments_adds_mirror_blocks_where_inputs_lie_ahead():
    seg = segments_example()
    got = L.with_segments(L.sliding(S, BS, 2), seg)[0].block_mask()[:, 0].int().tolist()
    # sample 0: block 0 (doc 0) gains block 1 (doc 0's input 16..20); block 1 (docs 0, 1) gains block 2 (doc 1's
    # input 32..33); sample 1: doc 0's input spans blocks 0..2, so blocks 0 and 1 look one block ahead (window 2)
    assert got == [[[1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 0], [0, 0, 1, 1]],
                   [[1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 0], [0, 0, 1, 1]]]
    plain = torch.zeros_like(seg)  # no inputs: the layout is unchanged
    assert torch.equal(L.with_segments(L.sliding(S, BS, 2), plain)[0].block_mask()[0, 0],
                       L.sliding(S, BS, 2).block_mask()[0, 0])


@pytest.mark.parametrize("options", ["plain", "alibi+bias"])
@pytest.mark.parametrize("kind", ["sliding-single-block", "strided", "topk-per-head", "ragged-lists"])
def test_block_gather_with_segments_matches_reference(kind, options, memory):
    H, seg = 4, segments_example()
    base = LAYOUTS[kind](H)
    bias = torch.randn(2, H, 4, base.max_kv, generator=torch.Generator().manual_seed(5)) if options != "plain" else None
    layout, bias = L.with_segments(base, seg, bias)
    slopes = alibi_slopes(H) if options != "plain" else None
    q, k, v, _ = inputs(H=H)
    assert_all_close(run(block_gather_attention, q, k, v, layout, bias, slopes, segments=seg),
                     run(block_sparse_reference, q, k, v, layout, bias, slopes, segments=seg), 3e-5)


@pytest.mark.parametrize("path", ["block-gather", "triton"])
def test_full_layout_with_segments_is_dense_prefix_lm(path):
    """With every causal block kept, the sparse kernels compute exactly the dense model's prefix-LM
    attention: SDPA with dense.sdpa_keep_mask and ALiBi's float mask (a second code path)."""
    H, seg = 4, segments_example()
    layout = L.with_segments(L.causal(S, BS), seg)[0]
    q, k, v, _ = inputs(H=H)
    slopes = alibi_slopes(H)

    def sdpa(q, k, v, layout, *, scale, block_bias, alibi_slopes, segments):
        rep = q.shape[1] // k.shape[1]
        mask = alibi_mask(alibi_slopes, S, S, sdpa_keep_mask(segments, S), q.dtype)
        return torch.nn.functional.scaled_dot_product_attention(
            q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=mask, scale=scale)

    fn = block_gather_attention if path == "block-gather" else triton_block_sparse_attention
    assert_all_close(run(fn, q, k, v, layout, slopes=slopes, segments=seg, device="cpu" if path != "triton" else DEVICE),
                     run(sdpa, q, k, v, layout, slopes=slopes, segments=seg), 1e-4)


# ---- Triton: interpreter on CPU (conftest turns it on), the real thing on a GPU ------------------
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("kind", LAYOUTS)
def test_triton_fp32_matches_reference(kind):
    H = 4
    layout = LAYOUTS[kind](H)
    q, k, v, bias = inputs(H=H, bias_shape=(2, H, 4, layout.max_kv))
    slopes = alibi_slopes(H)
    assert_all_close(run(triton_block_sparse_attention, q, k, v, layout, bias, slopes, DEVICE),
                     run(block_sparse_reference, q, k, v, layout, bias, slopes), 1e-4)


@pytest.mark.parametrize("kind", ["strided", "topk-per-head"])
def test_triton_with_segments_matches_reference(kind):
    H, seg = 4, segments_example()
    base = LAYOUTS[kind](H)
    layout, bias = L.with_segments(base, seg, torch.randn(2, H, 4, base.max_kv, generator=torch.Generator().manual_seed(5)))
    q, k, v, _ = inputs(H=H)
    slopes = alibi_slopes(H)
    assert_all_close(run(triton_block_sparse_attention, q, k, v, layout, bias, slopes, DEVICE, segments=seg),
                     run(block_sparse_reference, q, k, v, layout, bias, slopes, segments=seg), 1e-4)


@pytest.mark.parametrize("kind", ["sliding-single-block", "ragged-lists"])
def test_triton_head_dim_128_mha(kind):
    layout = LAYOUTS[kind](2)
    q, k, v, _ = inputs(B=1, H=2, H_kv=2, D=128)
    assert_all_close(run(triton_block_sparse_attention, q, k, v, layout, device=DEVICE),
                     run(block_sparse_reference, q, k, v, layout), 1e-4)


@pytest.mark.parametrize("kind", ["bigbird", "topk-per-head"])
def test_triton_fp16_matches_reference(kind):
    layout = LAYOUTS[kind](4)
    q, k, v, _ = inputs(dtype=torch.float16)
    slopes = alibi_slopes(4)
    got = run(triton_block_sparse_attention, q, k, v, layout, slopes=slopes, device=DEVICE)
    want = run(block_sparse_reference, q.float(), k.float(), v.float(), layout, slopes=slopes)
    assert_all_close(got, want, 2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the interpreter's bf16 tl.dot is wrong: GPU only")
def test_triton_bf16_matches_reference_on_gpu():
    layout = LAYOUTS["bigbird"](4)
    q, k, v, bias = inputs(dtype=torch.bfloat16, bias_shape=(2, 4, 4, layout.max_kv))
    got = run(triton_block_sparse_attention, q, k, v, layout, bias, device="cuda")
    want = run(block_sparse_reference, q.float(), k.float(), v.float(), layout, bias)
    assert_all_close(got, want, 2e-2, scaled=True)
