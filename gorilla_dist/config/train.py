"""train: steps, batch sizes, evaluation and logging intervals, the objectives mixture."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from omegaconf import MISSING

from gorilla_dist.config.checks import choice, positive
from gorilla_dist.errors import ConfigError

NONFINITE = ("skip", "stop")
OBJECTIVES = ("clm", "classify", "contrastive", "denoise", "permute")
DENOISE_MODES = ("R", "X", "S")
CLASSIFY_TARGETS = ("source", "label")


@dataclass
class ObjectiveConfig:
    """One pretraining objective of the mixture (train.objectives): its name, its share of the samples
    (and of the loss), and its options (each applies to the objectives named in its description)."""

    name: str = MISSING
    """clm (next-token prediction) | classify (which data.sources entry a sample comes from, from its
    mean-pooled final hidden states through a linear head) | contrastive (two halves of one document of
    the sample, attending each to itself only, are a positive pair; the other contrastive samples of the
    micro-batch on every data-parallel rank — the same part of the global batch for any data-parallel
    size: 1 / (accumulation count) of it — are negatives; InfoNCE on their projected, normalised means) |
    denoise (UL2: the sample corrupted by the denoiser `mode`, input bidirectional, loss on the target;
    needs data prepared with special_tokens=objectives; give several with different modes for UL2's
    mixture of denoisers) | permute (BART's sentence permutation: the sample's sentences shuffled, then
    <|sep|>, then the original; input bidirectional, loss on the original; special_tokens=objectives)."""
    weight: float = 1.0
    """This objective's share of every window of samples and of the loss (normalised over objectives)."""
    target: str = "source"
    """classify: what to predict: source (the sample's data.sources index, from its mean-pooled hidden
    states) | label (the `label` each example got at prepare time, from the hidden state of its last
    prompt token, as finetune.head=classification reads it; every example of a packed sample counts)."""
    labels: list[str] = field(default_factory=list)
    """classify target=label: the class names in id order; filled from the data by the run (checkpoints
    record them); given, they must be the data's."""
    temperature: float = 0.1
    """contrastive: the InfoNCE temperature."""
    projection: int = 64
    """contrastive: width of the linear projection the pooled halves go through before normalising."""
    mode: str = "R"
    """denoise: R | X (span corruption: spans of mean length `mean_span` covering `rate` of the source, each
    masked by a sentinel (or replaced / deleted: `mask`, `replace`, `delete`); the target: each sentinel and
    its span) | S (prefix -> continuation: the last
    `rate` of the source is the target). UL2's settings: R mean_span 3 rate 0.15; X mean_span 32 rate 0.15
    or mean_span 3 rate 0.5; S rate 0.25. mean_span 1 is BERT-style single-token masking."""
    mean_span: float = 3.0
    """denoise (R, X): the mean length of a corrupted span, in tokens (>= 1)."""
    rate: float = 0.15
    """denoise: the share of the source tokens that become the target (0 < rate < 1)."""
    mask: float = 1.0
    """denoise (R, X): weight of masking a corrupted span (the input holds its sentinel). With `replace` and
    `delete`, each span draws one of the three in proportion to the weights."""
    replace: float = 0.0
    """denoise (R, X): weight of replacing a span by as many random tokens (drawn from the sample's own
    source), with no sentinel: the model finds the span and restores it."""
    delete: float = 0.0
    """denoise (R, X): weight of deleting a span from the input (no sentinel): the model finds where."""


@dataclass
class TrainConfig:
    max_steps: int = 2000
    """Optimizer steps to train for."""
    global_batch_size: int = 12
    """Samples per optimizer step over all data-parallel ranks."""
    micro_batch_size: int | None = None
    """Samples per rank per forward/backward; None means global_batch_size / dp (no accumulation).
    global_batch_size must be a multiple of micro_batch_size * dp; the quotient is the
    gradient-accumulation count."""
    eval_interval: int = 250
    """Evaluate validation loss every this many steps (and at the end); 0 disables."""
    eval_samples: int = 240
    """Validation samples per evaluation: the same ones (the first of the validation blend) for every
    layout, micro-batch size and accumulation, so val_loss compares across them."""
    log_interval: int = 10
    """Steps between host syncs that flush metrics and refresh the progress bar."""
    compile: bool = False
    """torch.compile the model."""
    sample_tokens: int = 200
    """Tokens to generate after training as a sample (0 disables)."""
    sample_prompt: str = "\n"
    """Prompt for the end-of-training sample."""
    nonfinite: str = "skip"
    """A step whose loss or gradient norm is inf/NaN: skip (no update; the data is consumed) or stop
    (end the run with an error). Either way a non-finite model is never saved."""
    max_skipped_steps: int = 10
    """With nonfinite=skip: stop after this many skipped steps in a row (something is broken)."""
    objectives: list[ObjectiveConfig] = field(default_factory=lambda: [ObjectiveConfig(name="clm")])
    """Pretraining objectives mixed by weight, e.g. '[{name: clm, weight: 0.9}, {name: classify, weight: 0.1}]'
    (quoted on the command line). Each sample gets one objective (a deterministic rule: every window of
    samples follows the weights within one sample, whatever the data-parallel size); the loss is the
    weighted sum of each objective's mean over the global batch; metrics.jsonl logs each objective's loss
    (gorilla_dist/objectives/). The default, clm alone, is plain language-model pretraining."""


def grad_accum_steps(train, dp: int) -> int:
    """Micro-batches per rank per optimizer step (train: the TrainConfig)."""
    return train.global_batch_size // (train.micro_batch_size * dp)


def _validate_objectives(objectives, d, f) -> None:
    if not objectives:
        raise ConfigError(f"train.objectives is empty; give at least one of {list(OBJECTIVES)}, e.g. "
                          "'[{name: clm}]'")
    names = [o.name if o.name != "denoise" else f"denoise {o.mode}" for o in objectives]
    for i, o in enumerate(objectives):
        choice(o.name, OBJECTIVES, f"train.objectives[{i}].name")
        if not (o.weight > 0 and math.isfinite(o.weight)):
            raise ConfigError(f"train.objectives[{i}].weight={o.weight} ({o.name}) must be positive")
        choice(o.target, CLASSIFY_TARGETS, f"train.objectives[{i}].target")
        if not (o.temperature > 0 and math.isfinite(o.temperature)):
            raise ConfigError(f"train.objectives[{i}].temperature={o.temperature} must be positive")
        positive(o.projection, f"train.objectives[{i}].projection")
        choice(o.mode, DENOISE_MODES, f"train.objectives[{i}].mode")
        if not o.mean_span >= 1:
            raise ConfigError(f"train.objectives[{i}].mean_span={o.mean_span} must be >= 1 (tokens)")
        if not 0 < o.rate < 1:
            raise ConfigError(f"train.objectives[{i}].rate={o.rate} must be in (0, 1)")
        kinds = {k: getattr(o, k) for k in ("mask", "replace", "delete")}
        if not all(v >= 0 and math.isfinite(v) for v in kinds.values()) or not sum(kinds.values()) > 0:
            raise ConfigError(f"train.objectives[{i}]: mask={o.mask}, replace={o.replace}, delete={o.delete} are the "
                              "weights of each span's corruption: give non-negative numbers, not all 0")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"train.objectives names {twice[0]} twice; give each objective once with its weight")
    by_source = any(o.name == "classify" and o.target == "source" for o in objectives)
    if by_source and not d.sources:
        raise ConfigError("train.objectives: classify predicts which data.sources entry a sample comes from; give "
                          "two or more data.sources (or target: label, for data prepared with labels)")
    if by_source and len(d.sources) < 2:
        raise ConfigError(f"train.objectives: classify with {len(d.sources)} data.sources has nothing to tell apart; "
                          "give two or more sources")
    if names != ["clm"] and f.head != "none":
        raise ConfigError(f"train.objectives={names} with finetune.head={f.head}: a classification run has its own "
                          "loss; use the default train.objectives")


def check_train(t, d, f) -> None:
    """train: step counts, intervals, the objectives (d: the data section, f: the finetune section)."""
    for key in ("max_steps", "micro_batch_size", "global_batch_size", "log_interval", "eval_samples",
                "max_skipped_steps"):
        positive(getattr(t, key), f"train.{key}")
    for key in ("eval_interval", "sample_tokens"):
        positive(getattr(t, key), f"train.{key}", allow_zero=True)
    choice(t.nonfinite, NONFINITE, "train.nonfinite")
    _validate_objectives(t.objectives, d, f)


def check_batch(t, dp: int, where: str = "") -> None:
    """The global batch splits into micro-batches on every data-parallel rank (`where`: the world size's
    source, said when several world sizes are possible)."""
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(
            f"train.global_batch_size({t.global_batch_size}) is not divisible by "
            f"train.micro_batch_size({t.micro_batch_size}) * data_parallel({dp}) = {t.micro_batch_size * dp}{where}")
