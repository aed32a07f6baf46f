"""The input -> target objectives of a decoder-only model: UL2's denoisers and BART's sentence permutation.

UL2's denoisers for a decoder-only model (Tay et al. 2022; levanter's UL2 for the layout), as a pure
function of a sample's tokens and a seeded generator.

    R, X  span corruption (T5): about `rate` of the source tokens, in spans of mean length `mean_span`,
          are each replaced by a sentinel; the input is [mode token] + the corrupted text, the target the
          sentinels each followed by the span it stands for (R: mu 3, r 0.15; X: long spans or high rates;
          mean_span 1 is single-token masking, BERT's MLM in this layout). A span may instead be replaced
          by random tokens or deleted (BART's noising; weights `mask`, `replace`, `delete`): the input then
          has no sentinel for it, the target is the same.
    S     prefix -> continuation: the input is [<|mode:S|>] + the first part, the target the rest
          (`rate` of the source tokens)

The sample then holds input + target (then <eod> padding); the loss is on the target tokens only; the
input part attends bidirectionally (prefix-LM: gorilla_dist/kernels/dense.py BIDIRECTIONAL), the target causally. The
source is the sample's first tokens, as many as leave room for the sentinels (its documents are
corrupted as one text: UL2 packs the same way).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from gorilla_dist.data.tokenizer import N_SENTINELS
from gorilla_dist.config.checks import choice
from gorilla_dist.errors import ConfigError
from gorilla_dist.kernels.limits import BIDIRECTIONAL
from gorilla_dist.objectives.base import ObjectiveOptions
from gorilla_dist.objectives.clm import CLM


def _segment(rng: np.random.Generator, total: int, parts: int) -> np.ndarray:
    """`parts` positive lengths summing to `total` (T5's random segmentation)."""
    cuts = np.sort(rng.choice(np.arange(1, total), size=parts - 1, replace=False)) if parts > 1 else np.empty(0, int)
    return np.diff(np.concatenate([[0], cuts, [total]])).astype(np.int64)


MASK, REPLACE, DELETE = 0, 1, 2
"""What happens to a corrupted span in the input: its sentinel | as many random tokens | nothing."""


def corrupt(tokens: np.ndarray, room: int, rng: np.random.Generator, *, mode: str, mean_span: float, rate: float,
            mode_token: int, sentinels: list[int], kinds: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """(input + target tokens, length of the input) for a source `tokens` (its first ones are used),
    fitting in `room` tokens. A source of one token is its own continuation (S) or one span (R, X).
    `kinds`: the probabilities of MASK, REPLACE, DELETE per span (None: every span masked); replaced spans
    take random tokens of the source itself (never a special token), and only masked spans leave their
    sentinel in the input; the target lists every span after its sentinel either way."""
    if mode == "S":
        n = min(len(tokens), room - 1)
        cut = max(1, n - max(1, round(n * rate))) if n > 1 else 0
        return np.concatenate([[mode_token], tokens[:n]]), 1 + cut
    n = min(len(tokens), room - 1)
    grow = kinds is not None and kinds[REPLACE] > 0  # replaced spans are in the input and in the target
    while True:  # the source length that leaves room for 2 sentinels per span and the mode token
        noise = min(max(1, round(n * rate)), max(n - 1, 1))
        spans = max(1, min(round(noise / mean_span), noise, max(n - noise, 1), N_SENTINELS))
        if n + 2 * spans + 1 + (noise if grow else 0) <= room or n <= 1:
            break
        n -= 1
    source = tokens[:n]
    if n <= 1:  # nothing to keep: the one token is the span
        noise_lens, keep_lens = np.array([n]), np.array([0])
    else:
        noise_lens, keep_lens = _segment(rng, noise, spans), _segment(rng, n - noise, spans)
    how = np.zeros(len(noise_lens), int) if kinds is None else rng.choice(3, size=len(noise_lens), p=kinds)
    inputs, targets, at = [mode_token], [], 0
    for i, (keep, span) in enumerate(zip(keep_lens, noise_lens)):
        inputs += source[at:at + keep].tolist()
        if how[i] == MASK:
            inputs.append(sentinels[i])
        elif how[i] == REPLACE:
            inputs += source[rng.integers(0, n, span)].tolist()
        targets += [sentinels[i]] + source[at + keep:at + keep + span].tolist()
        at += keep + span
    return np.array(inputs + targets, dtype=np.int64), len(inputs)


def corrupt_rows(windows: np.ndarray, valid: np.ndarray, segments: np.ndarray, targets: np.ndarray, rows: np.ndarray,
                 keys: list[tuple[int, ...]], make, eod: int) -> None:
    """In place, for each row in `rows` (bool): its window (valid tokens) becomes `make(tokens, rng)`'s input +
    target (a denoiser's `corrupt`, permute's `permute_sentences`), then <eod> padding; segments mark the input
    bidirectional (BIDIRECTIONAL) and the padding apart; targets (loss mask) the target tokens. `keys`: each
    row's seed (run seed, source, sample index)."""
    for r in np.flatnonzero(rows):
        rng = np.random.default_rng([*keys[r], 0xD0])
        seq, n_in = make(windows[r, :valid[r]].copy(), rng)
        m = len(seq)
        windows[r, :m], windows[r, m:], valid[r] = seq, eod, m
        segments[r, :n_in], segments[r, n_in:m], segments[r, m:] = BIDIRECTIONAL, 0, 1
        targets[r, :n_in], targets[r, n_in:m], targets[r, m:] = 0, 1, 0


SENTENCE_ENDS = (".", "!", "?", "\n")
"""A token whose text ends with one of these ends a sentence (permute's rule, for every tokenizer: a char
or byte tokenizer's ids of these characters; a BPE / Hugging Face tokenizer's tokens whose decoded text,
trailing spaces removed, ends with one); <eod> ends one too."""


def sentence_ends(tokenizer) -> np.ndarray:
    """(vocab_size,) bool: the tokens that end a sentence."""
    ends = np.zeros(tokenizer.vocab_size, dtype=bool)
    for i in range(tokenizer.vocab_size):
        if i == tokenizer.eod:
            ends[i] = True
        else:
            try:
                text = tokenizer.decode([i])
            except Exception:  # noqa: BLE001 - an id a tokenizer cannot decode alone ends nothing
                continue
            ends[i] = text.rstrip(" ").endswith(SENTENCE_ENDS)
    return ends


def permute_sentences(tokens: np.ndarray, room: int, rng: np.random.Generator, *, ends: np.ndarray,
                      sep: int) -> tuple[np.ndarray, int]:
    """BART's sentence permutation, decoder-only: (the source's sentences shuffled + <|sep|>, then the
    source as it was; length of the input part). The source is the first tokens that leave room for
    both copies; one sentence (no boundary) stays as it is."""
    n = min(len(tokens), (room - 1) // 2)
    source = tokens[:n]
    cut = np.flatnonzero(ends[source[:-1]]) + 1  # a sentence ends after an end token
    sentences = np.split(source, cut)
    order = rng.permutation(len(sentences))
    shuffled = np.concatenate([sentences[i] for i in order]) if n else source
    return np.concatenate([shuffled, [sep], source]).astype(np.int64), n + 1


DENOISE_MODES = ("R", "X", "S")


@dataclass
class DenoiseOptions(ObjectiveOptions):
    mode: str = "R"
    """R | X (span corruption: spans of mean length `mean_span` covering `rate` of the source, each masked by a
    sentinel (or replaced / deleted: `mask`, `replace`, `delete`); the target: each sentinel and its span) |
    S (prefix -> continuation: the last `rate` of the source is the target). UL2's settings: R mean_span 3
    rate 0.15; X mean_span 32 rate 0.15 or mean_span 3 rate 0.5; S rate 0.25. mean_span 1 is BERT-style
    single-token masking. Give several denoise objectives with different modes for UL2's mixture."""
    mean_span: float = 3.0
    """R, X: the mean length of a corrupted span, in tokens (>= 1)."""
    rate: float = 0.15
    """The share of the source tokens that become the target (0 < rate < 1)."""
    mask: float = 1.0
    """R, X: weight of masking a corrupted span (the input holds its sentinel). With `replace` and `delete`,
    each span draws one of the three in proportion to the weights."""
    replace: float = 0.0
    """R, X: weight of replacing a span by as many random tokens (drawn from the sample's own source), with no
    sentinel: the model finds the span and restores it."""
    delete: float = 0.0
    """R, X: weight of deleting a span from the input (no sentinel): the model finds where."""


class Denoise(CLM):
    """UL2's denoiser `mode`: input bidirectional, the next-token loss on the target."""

    name = "denoise"
    Options = DenoiseOptions
    input_to_target = True
    own_view = True

    @classmethod
    def check(cls, o, where: str, data, finetune) -> None:
        choice(o.mode, DENOISE_MODES, f"{where}.mode")
        if not o.mean_span >= 1:
            raise ConfigError(f"{where}.mean_span={o.mean_span} must be >= 1 (tokens)")
        if not 0 < o.rate < 1:
            raise ConfigError(f"{where}.rate={o.rate} must be in (0, 1)")
        kinds = {k: getattr(o, k) for k in ("mask", "replace", "delete")}
        if not all(v >= 0 and math.isfinite(v) for v in kinds.values()) or not sum(kinds.values()) > 0:
            raise ConfigError(f"{where}: mask={o.mask}, replace={o.replace}, delete={o.delete} are the weights of "
                              "each span's corruption: give non-negative numbers, not all 0")

    @classmethod
    def label(cls, o) -> str:
        return f"denoise {o.mode}"

    @classmethod
    def key_of(cls, o) -> str:
        return f"denoise_{o.mode}"

    def corrupt(self, loader, windows, valid, segments, targets, rows, keys) -> None:
        o, tok = self.options, loader.tokenizer
        mode_token = tok.special_id(f"<|mode:{o.mode}|>")
        sentinels = [tok.special_id(f"<|sentinel:{i}|>") for i in range(N_SENTINELS)]
        weights = np.array([o.mask, o.replace, o.delete], dtype=np.float64)
        kinds = None if weights[MASK] == weights.sum() else weights / weights.sum()
        width = windows.shape[1]

        def make(tokens, rng):
            return corrupt(tokens, width, rng, mode=o.mode, mean_span=o.mean_span, rate=o.rate, mode_token=mode_token,
                           sentinels=sentinels, kinds=kinds)

        corrupt_rows(windows, valid, segments, targets, rows, keys, make, tok.eod)
