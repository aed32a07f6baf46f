"""data: the corpus or prepared sources, the tokenizer, packing, validation split."""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

from gorilla_dist.config.checks import choice
from gorilla_dist.data.format import VERIFY
from gorilla_dist.errors import ConfigError

SAMPLE_BY = ("document", "paragraph", "line")


@dataclass
class SourceConfig:
    path: str = MISSING
    """A dataset directory written by `python -m gorilla_dist.data.prepare`."""
    weight: float = 1.0
    """This source's share of the training samples (weights are normalised over the sources)."""


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    """Prepared datasets to blend, e.g. '[{path: data/web, weight: 0.7}, {path: data/code, weight: 0.3}]'.
    Empty: prepare `path` into run.dir/data and train on it."""
    path: str | None = None
    """A text file prepared into run.dir/data when `sources` is empty; None means the bundled
    tinyshakespeare corpus."""
    tokenizer: str = "char"
    """For `path`: char | byte | bpe:<vocab_size> | a Hugging Face tokenizer.json (or its directory)."""
    sample_by: str = "paragraph"
    """For `path`: what one document is: document (the file) | paragraph (blank-line separated) | line."""
    val_fraction: float = 0.1
    """Fraction of each source's documents (its last ones) held out for validation."""
    reset_at_eod: bool = False
    """Attention, position ids and the loss restart at every document boundary inside a packed sample."""
    pack: bool = True
    """Instruction data (prepared with format=instruction): several whole examples per sample, each
    attending only to itself (dense attention builds the mask); false: one example per sample, padded
    (plain causal attention: works with flash and the block-sparse layouts too)."""
    truncate: bool = False
    """Instruction data: an example longer than model.seq_length + 1 tokens is refused (false) or cut to
    its first model.seq_length + 1 tokens (true; the count is printed)."""
    verify: str = "checksum"
    """At start, check the sources' files against meta.json: checksum (sha256, ~1 s/GB) | size."""


def check_data(d, t) -> None:
    """data (t: the train section, whose evaluation needs held-out documents)."""
    choice(d.sample_by, SAMPLE_BY, "data.sample_by")
    choice(d.verify, VERIFY, "data.verify")
    if not 0.0 <= d.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction={d.val_fraction} must be in [0, 1)")
    if d.val_fraction == 0 and t.eval_interval:
        raise ConfigError(f"data.val_fraction=0 leaves nothing to evaluate but train.eval_interval={t.eval_interval}; "
                          "set train.eval_interval=0 or a positive data.val_fraction")
    if d.sources and d.path is not None:
        raise ConfigError("data.sources and data.path are both set; give prepared data.sources, or one data.path "
                          "to prepare into run.dir/data")
    for i, src in enumerate(d.sources):
        if not src.weight > 0:
            raise ConfigError(f"data.sources[{i}].weight={src.weight} must be positive")
