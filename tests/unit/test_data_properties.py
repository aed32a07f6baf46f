"""Property-based tests (hypothesis) of the data pipeline's invariants."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gorilla_dist.data.dataset import Span
from gorilla_dist.data.order import Blend, permute
from test_data import loader, make_dataset

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(n=st.integers(1, 3000), key=st.tuples(st.integers(0, 2**32), st.integers(0, 7), st.integers(0, 100)))
def test_permute_is_a_bijection(n, key):
    p = permute(np.arange(n), n, key)
    assert np.array_equal(np.sort(p), np.arange(n))
    assert np.array_equal(permute(np.arange(n)[::-1], n, key), p[::-1])  # pointwise: order of queries is free


class Stream:
    """An in-memory token stream with the two methods Span uses."""

    eod = 10**6

    def __init__(self, tokens):
        self.tokens = tokens

    def read(self, a, b):
        return self.tokens[a:b]


@SETTINGS
@given(doc_lengths=st.lists(st.integers(1, 40), min_size=1, max_size=30), seq=st.integers(1, 33),
       cut=st.floats(0, 1))
def test_packing_never_loses_or_repeats_a_token(doc_lengths, seq, cut):
    tokens = np.arange(sum(doc_lengths))
    a = int(cut * (len(tokens) - 1))
    span = Span(Stream(tokens), a, len(tokens), seq)
    inputs, targets = [], []
    for j in range(span.samples):
        w = np.empty(seq + 1, dtype=np.int64)
        valid = span.window(j, w)
        assert (w[valid:] == Stream.eod).all()
        inputs.append(w[:valid - 1])  # inputs whose target is real
        targets.append(w[1:valid])
    got_in = np.concatenate(inputs) if inputs else np.empty(0)
    got_out = np.concatenate(targets) if targets else np.empty(0)
    assert np.array_equal(got_in, tokens[a:-1]) and np.array_equal(got_out, tokens[a + 1:])


@SETTINGS
@given(weights=st.lists(st.floats(0.05, 1.0), min_size=1, max_size=4))
def test_blend_shares_stay_within_one_percent_over_every_10000_window(weights):
    sources, index = Blend(weights).take(30_000)
    w = np.asarray(weights) / sum(weights)
    for s in range(len(w)):
        mine = sources == s
        counts = np.concatenate([[0], np.cumsum(mine)])
        window = counts[10_000:] - counts[:-10_000]  # every window of 10,000 consecutive samples
        assert np.abs(window / 10_000 - w[s]).max() <= 0.01
        assert np.array_equal(index[mine], np.arange(mine.sum()))  # each source's stream in order
    again = Blend(weights).take(30_000)
    assert np.array_equal(again[0], sources)  # a pure function of the weights


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("props")
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon"]
    one = make_dataset(root / "one", [" ".join(rng.choice(words, rng.integers(1, 12))) for _ in range(60)])
    two = make_dataset(root / "two", [" ".join(rng.choice(words, rng.integers(1, 30))) for _ in range(40)])
    return [one, two]


def rows(batches) -> torch.Tensor:
    return torch.cat([torch.cat([b.tokens, b.labels[:, -1:]], dim=1) for b in batches])


def global_rows(datasets, weights, *, dp: int, micro: int, global_batch: int, steps: int, state=None):
    """Run `dp` rank loaders for `steps` steps; the global batches' samples in global order, and the state."""
    ranks = [loader(datasets, weights, dp=dp, rank=r, micro=micro, global_batch=global_batch) for r in range(dp)]
    if state is not None:
        for r in ranks:
            r.load_state_dict(state)
    out = []
    for _ in range(steps):
        out.append(torch.cat([rows(r.next_train_batches()) for r in ranks]))
    states = [r.state_dict() for r in ranks]
    assert all(s == states[0] for s in states)  # every rank agrees on the position
    return (torch.cat(out) if out else torch.empty(0, 17, dtype=torch.long)), states[0]


@SETTINGS
@given(dp=st.sampled_from([2, 4]), micro=st.sampled_from([1, 2]), steps=st.integers(1, 4))
def test_ranks_are_disjoint_and_together_the_single_rank_batch(sources, dp, micro, steps):
    single, _ = global_rows(sources, [0.6, 0.4], dp=1, micro=8, global_batch=8, steps=steps)
    for rank in range(dp):  # each rank: its own contiguous slice of the global batch
        mine = rows(loader(sources, [0.6, 0.4], dp=dp, rank=rank, micro=micro, global_batch=8).next_train_batches())
        assert torch.equal(mine, single[rank * 8 // dp:(rank + 1) * 8 // dp])
    split, _ = global_rows(sources, [0.6, 0.4], dp=dp, micro=micro, global_batch=8, steps=steps)
    assert torch.equal(split, single)


@SETTINGS
@given(dp1=st.sampled_from([1, 2, 4]), dp2=st.sampled_from([1, 2, 4]), batch2=st.sampled_from([4, 8, 12]),
       before=st.integers(0, 5), after=st.integers(1, 5))
def test_resume_on_another_dp_size_continues_the_same_sequence(sources, dp1, dp2, batch2, before, after):
    w = [0.7, 0.3]
    whole, _ = global_rows(sources, w, dp=1, micro=4, global_batch=4, steps=(8 * before + batch2 * after) // 4)
    first, state = global_rows(sources, w, dp=dp1, micro=8 // dp1, global_batch=8, steps=before)
    second, _ = global_rows(sources, w, dp=dp2, micro=batch2 // dp2, global_batch=batch2, steps=after, state=state)
    n = len(first) + len(second)
    assert torch.equal(torch.cat([first, second]), whole[:n])


def test_every_sample_once_per_epoch_and_every_token_an_input_once(sources):
    one = sources[0]
    data = loader([one], micro=4, global_batch=4, val_fraction=0.1)
    span = data.train[0]
    epochs = []
    for _ in range(2):
        got = [rows(data.next_train_batches()) for _ in range(-(-span.samples // 4))]
        epochs.append(torch.cat(got))
    flat = torch.cat(epochs)
    first, second = flat[:span.samples], flat[span.samples:2 * span.samples]
    unshuffled = torch.from_numpy(np.stack([_window(span, j) for j in range(span.samples)]))
    for epoch in (first, second):
        assert torch.equal(_sort_rows(epoch), _sort_rows(unshuffled))  # each sample exactly once
    assert not torch.equal(first, second)  # reshuffled each epoch
    assert not torch.equal(first, unshuffled)


def _window(span, j):
    w = np.empty(span.seq + 1, dtype=np.int64)
    span.window(j, w)
    return w


def _sort_rows(t: torch.Tensor) -> torch.Tensor:
    order = np.lexsort(t.numpy().T[::-1])
    return t[torch.from_numpy(order)]
