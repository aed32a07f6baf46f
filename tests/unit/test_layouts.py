"""Block-sparse layouts: each builder against hand-written block lists, and the layout invariants."""

import pytest
import torch

from gorilla_dist.kernels import layouts as L


def lists(layout, b=0, h=0):
    num, idx = layout.kv_num_blocks[b, h], layout.kv_indices[b, h]
    return [idx[m, :num[m]].tolist() for m in range(layout.n_blocks)]


def test_causal_is_dense():
    lay = L.causal(64, 16)
    assert lists(lay) == [[0], [0, 1], [0, 1, 2], [0, 1, 2, 3]]
    assert lay.density() == 1.0
    assert torch.equal(lay.dense_mask()[0, 0], torch.ones(64, 64, dtype=torch.bool).tril())


def test_sliding_window():
    assert lists(L.sliding(96, 16, 2)) == [[0], [0, 1], [1, 2], [2, 3], [3, 4], [4, 5]]
    single = L.sliding(64, 16, 1)  # every query block sees one key block: its own
    assert lists(single) == [[0], [1], [2], [3]] and single.max_kv == 1


def test_strided_fixed_pattern():
    # chunks of 4 blocks: own chunk up to itself + the last block (3) of the earlier chunk
    assert lists(L.strided(8 * 16, 16, stride=4)) == [
        [0], [0, 1], [0, 1, 2], [0, 1, 2, 3], [3, 4], [3, 4, 5], [3, 4, 5, 6], [3, 4, 5, 6, 7]]
    assert lists(L.strided(8 * 16, 16, stride=4, window=2))[4] == [3, 4]


def test_bigbird_global_window_and_seeded_random_per_head():
    lay = L.bigbird(16 * 16, 16, num_heads=4, global_blocks=1, window=2, random_blocks=2, seed=7)
    again = L.bigbird(16 * 16, 16, num_heads=4, global_blocks=1, window=2, random_blocks=2, seed=7)
    other = L.bigbird(16 * 16, 16, num_heads=4, global_blocks=1, window=2, random_blocks=2, seed=8)
    assert torch.equal(lay.kv_indices, again.kv_indices)
    assert not torch.equal(lay.kv_indices, other.kv_indices)
    mask = lay.block_mask()[0]  # (heads, n, n)
    assert not torch.equal(mask[0], mask[1]), "random blocks differ per head"
    for h in range(4):
        for m in range(16):
            row = set(lists(lay, h=h)[m])
            fixed = {0, m, m - 1} & set(range(m + 1))
            assert fixed <= row and row <= set(range(m + 1))
            assert len(row - fixed) == min(2, m + 1 - len(fixed))
    # a tensor-parallel rank's slice equals those heads of the full pattern
    assert torch.equal(lay.heads(2, 4).kv_indices, lay.kv_indices[:, 2:4])


def test_user_lists_add_the_diagonal_and_refuse_future_blocks():
    lay = L.from_lists([[0], [0], [1], [0, 2]], 64, 16)
    assert lists(lay) == [[0], [0, 1], [1, 2], [0, 2, 3]]
    per_head = L.from_lists([[[0], [1], [2], [3]], [[0], [0], [0], [0]]], 64, 16)
    assert lists(per_head, h=1) == [[0], [0, 1], [0, 2], [0, 3]]
    with pytest.raises(ValueError, match="query block 1 lists key block 2"):
        L.from_lists([[0], [2], [2], [3]], 64, 16)
    with pytest.raises(ValueError, match="3 rows for 4 query blocks"):
        L.from_lists([[0], [1], [2]], 64, 16)


def test_topk_keeps_forced_blocks_and_best_scores():
    scores = torch.tensor([[0.0, 0, 0, 0, 0], [5, 0, 0, 0, 0], [1, 9, 0, 0, 0], [1, 2, 8, 0, 0], [1, 7, 3, 6, 0]])
    num, idx = L.topk(scores[None, None], 3)
    lay = L.BlockLayout(num, idx, 16)
    assert lists(lay) == [[0], [0, 1], [0, 1, 2], [0, 2, 3], [0, 1, 4]]
    num, idx = L.topk(scores[None, None], 2, keep_first=False)
    assert lists(L.BlockLayout(num, idx, 16)) == [[0], [0, 1], [1, 2], [2, 3], [1, 4]]


def test_transposed_layout_lists_every_visit_once():
    lay = L.bigbird(12 * 16, 16, num_heads=3, global_blocks=1, window=2, random_blocks=3, seed=1)
    q_num, q_idx, q_slot = lay.transposed
    visits = set()
    for h in range(3):
        for j in range(12):
            ms = q_idx[0, h, j, :q_num[0, h, j]].tolist()
            assert ms == sorted(ms)
            for m, slot in zip(ms, q_slot[0, h, j, :q_num[0, h, j]].tolist()):
                assert lay.kv_indices[0, h, m, slot] == j and slot < lay.kv_num_blocks[0, h, m]
                visits.add((h, m, j))
    assert len(visits) == int(lay.kv_num_blocks.sum())


def test_density_and_block_size_checks():
    assert L.sliding(64 * 16, 16, 1).density() == pytest.approx(64 / (64 * 65 / 2))
    with pytest.raises(ValueError, match="block_size=48: must be one of 16, 32, 64, 128"):
        L.causal(96, 48)
    with pytest.raises(ValueError, match="not a multiple of block_size=32"):
        L.causal(80, 32)
