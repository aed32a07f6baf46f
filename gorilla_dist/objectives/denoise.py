"""UL2's denoisers for a decoder-only model (Tay et al. 2022; levanter's UL2 for the layout), as a pure
function of a sample's tokens and a seeded generator.

    R, X  span corruption (T5): about `rate` of the source tokens, in spans of mean length `mean_span`,
          are each replaced by a sentinel; the input is [mode token] + the corrupted text, the target the
          sentinels each followed by the span it stands for (R: mu 3, r 0.15; X: long spans or high rates;
          mean_span 1 is single-token masking, BERT's MLM in this layout)
    S     prefix -> continuation: the input is [<|mode:S|>] + the first part, the target the rest
          (`rate` of the source tokens)

The sample then holds input + target (then <eod> padding); the loss is on the target tokens only; the
input part attends bidirectionally (prefix-LM: kernels/dense.py BIDIRECTIONAL), the target causally. The
source is the sample's first tokens, as many as leave room for the sentinels (its documents are
corrupted as one text: UL2 packs the same way).
"""

from __future__ import annotations

import numpy as np

from gorilla_dist.data.tokenizer import N_SENTINELS
from gorilla_dist.kernels.limits import BIDIRECTIONAL

MODES = ("R", "X", "S")


def _segment(rng: np.random.Generator, total: int, parts: int) -> np.ndarray:
    """`parts` positive lengths summing to `total` (T5's random segmentation)."""
    cuts = np.sort(rng.choice(np.arange(1, total), size=parts - 1, replace=False)) if parts > 1 else np.empty(0, int)
    return np.diff(np.concatenate([[0], cuts, [total]])).astype(np.int64)


def corrupt(tokens: np.ndarray, room: int, rng: np.random.Generator, *, mode: str, mean_span: float, rate: float,
            mode_token: int, sentinels: list[int]) -> tuple[np.ndarray, int]:
    """(input + target tokens, length of the input) for a source `tokens` (its first ones are used),
    fitting in `room` tokens. A source of one token is its own continuation (S) or one span (R, X)."""
    if mode == "S":
        n = min(len(tokens), room - 1)
        cut = max(1, n - max(1, round(n * rate))) if n > 1 else 0
        return np.concatenate([[mode_token], tokens[:n]]), 1 + cut
    n = min(len(tokens), room - 1)
    while True:  # the source length that leaves room for 2 sentinels per span and the mode token
        noise = min(max(1, round(n * rate)), max(n - 1, 1))
        spans = max(1, min(round(noise / mean_span), noise, max(n - noise, 1), N_SENTINELS))
        if n + 2 * spans + 1 <= room or n <= 1:
            break
        n -= 1
    source = tokens[:n]
    if n <= 1:  # nothing to keep: the one token is the span
        noise_lens, keep_lens = np.array([n]), np.array([0])
    else:
        noise_lens, keep_lens = _segment(rng, noise, spans), _segment(rng, n - noise, spans)
    inputs, targets, at = [mode_token], [], 0
    for i, (keep, span) in enumerate(zip(keep_lens, noise_lens)):
        inputs += source[at:at + keep].tolist() + [sentinels[i]]
        targets += [sentinels[i]] + source[at + keep:at + keep + span].tolist()
        at += keep + span
    return np.array(inputs + targets, dtype=np.int64), len(inputs)


def corrupt_rows(windows: np.ndarray, valid: np.ndarray, segments: np.ndarray, targets: np.ndarray, rows: np.ndarray,
                 keys: list[tuple[int, ...]], cfg, tokenizer) -> None:
    """In place, for each row in `rows` (bool): its window (valid tokens) becomes input + target of
    denoiser `cfg` (an ObjectiveConfig: mode, mean_span, rate), then <eod> padding; segments mark the input
    bidirectional (BIDIRECTIONAL) and the padding apart; targets (loss mask) the target tokens. `keys`:
    each row's seed (run seed, source, sample index)."""
    mode_token = tokenizer.special_id(f"<|mode:{cfg.mode}|>")
    sentinels = [tokenizer.special_id(f"<|sentinel:{i}|>") for i in range(N_SENTINELS)]
    width, eod = windows.shape[1], tokenizer.eod
    for r in np.flatnonzero(rows):
        rng = np.random.default_rng([*keys[r], 0xD0])
        seq, n_in = corrupt(windows[r, :valid[r]].copy(), width, rng, mode=cfg.mode, mean_span=cfg.mean_span,
                            rate=cfg.rate, mode_token=mode_token, sentinels=sentinels)
        m = len(seq)
        windows[r, :m], windows[r, m:], valid[r] = seq, eod, m
        segments[r, :n_in], segments[r, n_in:m], segments[r, m:] = BIDIRECTIONAL, 0, 1
        targets[r, :n_in], targets[r, n_in:m], targets[r, m:] = 0, 1, 0
