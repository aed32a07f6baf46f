"""The sample order: a shuffle that needs no table, and a deterministic weighted blend of sources.

Both are pure functions of small integers, so the loader's whole state is a few counters and any
position of any epoch can be computed directly, whatever the corpus size.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a fast 64-bit avalanche (uint64 arithmetic wraps by design)."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


@lru_cache(maxsize=1024)
def _round_keys(key: tuple[int, ...]) -> np.ndarray:
    return np.random.SeedSequence(list(key)).generate_state(4, dtype=np.uint64)


def permute(index: np.ndarray, n: int, key: tuple[int, ...]) -> np.ndarray:
    """A pseudorandom permutation of range(n), evaluated at `index` without materialising it.

    A 4-round balanced Feistel network over the smallest even number of bits that covers n, with
    cycle-walking (re-applying the network until the value falls below n; the restriction of a
    permutation to [0, n) by cycle-walking is itself a permutation). Memory is O(len(index)), so
    shuffling 10^9 samples costs nothing up front. `key` (e.g. (seed, source, epoch)) picks the
    permutation."""
    index = np.asarray(index, dtype=np.int64)
    if n <= 1:
        return index.copy()
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    mask, shift = np.uint64((1 << half) - 1), np.uint64(half)
    keys = _round_keys(tuple(key))
    x = index.astype(np.uint64)
    todo = np.ones(len(x), dtype=bool)
    while todo.any():
        left, right = x[todo] >> shift, x[todo] & mask
        for k in keys:
            left, right = right, left ^ (_mix(right ^ k) & mask)
        x[todo] = (left << shift) | right
        todo = x >= np.uint64(n)
    return x.astype(np.int64)


class Blend:
    """Which source each sample comes from: sample i goes to the source furthest behind its share,
    argmax_s(weight_s * (i + 1) - count_s) (ties: the lower index). This is Megatron's blended-dataset
    rule; deterministic, with every prefix — and so every window — within a couple of samples of the
    weights. State: the position and the per-source counts."""

    def __init__(self, weights: list[float]):
        w = np.asarray(weights, dtype=np.float64)
        if len(w) == 0 or (w <= 0).any() or not np.isfinite(w).all():
            raise ValueError(f"blend weights must be positive and finite, got {list(weights)}")
        self.weights = (w / w.sum()).tolist()
        self.position = 0
        self.counts = [0] * len(w)

    def take(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The next n samples: (source id, index within that source's sample stream), each (n,)."""
        sources, index = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.int64)
        w, counts = self.weights, self.counts
        ids = range(len(w))
        for i in range(n):
            pos = self.position + i + 1
            s = max(ids, key=lambda j: w[j] * pos - counts[j]) if len(w) > 1 else 0
            sources[i], index[i] = s, counts[s]
            counts[s] += 1
        self.position += n
        return sources, index

    def state_dict(self) -> dict:
        return {"position": self.position, "counts": list(self.counts)}

    def load_state_dict(self, state: dict) -> None:
        if len(state["counts"]) != len(self.counts):
            raise ValueError(f"the saved blend has {len(state['counts'])} sources, this one {len(self.counts)}")
        self.position, self.counts = int(state["position"]), [int(c) for c in state["counts"]]
