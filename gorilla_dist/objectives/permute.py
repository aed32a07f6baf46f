"""permute: BART's sentence permutation, decoder-only: the sample's sentences shuffled, then <|sep|>, then the
original; the input attends bidirectionally, the loss is on the original (data prepared with
special_tokens=objectives; objectives/denoise.py has the corruption)."""

from __future__ import annotations

from gorilla_dist.objectives.clm import CLM


class Permute(CLM):
    name = "permute"
    input_to_target = True
    own_view = True

    ends = None
    """The tokens that end a sentence (denoise.sentence_ends: a pass over the vocabulary), built on first use."""

    def corrupt(self, loader, windows, valid, segments, targets, rows, keys) -> None:
        from gorilla_dist.objectives.denoise import corrupt_rows, permute_sentences, sentence_ends

        tok, width = loader.tokenizer, windows.shape[1]
        if self.ends is None:
            self.ends = sentence_ends(tok)
        sep = tok.special_id("<|sep|>")

        def make(tokens, rng):
            return permute_sentences(tokens, width, rng, ends=self.ends, sep=sep)

        corrupt_rows(windows, valid, segments, targets, rows, keys, make, tok.eod)
