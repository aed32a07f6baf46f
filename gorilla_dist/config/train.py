"""train: steps, batch sizes, evaluation and logging intervals, the objectives mixture."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gorilla_dist.config.checks import choice, positive
from gorilla_dist.errors import ConfigError
from gorilla_dist.objectives import check_objectives

NONFINITE = ("skip", "stop")
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
    objectives: list[Any] = field(default_factory=lambda: [{"name": "clm", "weight": 1.0}])
    """Pretraining objectives mixed by weight, e.g. '[{name: clm, weight: 0.9}, {name: classify, weight: 0.1}]'
    (quoted on the command line): each entry's `name` (clm | classify | contrastive | denoise | permute, or an
    installed plug-in's), its `weight`, and that objective's own options (gorilla_dist/objectives/<name>.py:
    classify's target and labels, contrastive's temperature and projection, denoise's mode, mean_span, rate,
    mask, replace and delete). Each sample gets one objective (a deterministic rule: every window of
    samples follows the weights within one sample, whatever the data-parallel size); the loss is the
    weighted sum of each objective's mean over the global batch; metrics.jsonl logs each objective's loss.
    The default, clm alone, is plain language-model pretraining."""


def grad_accum_steps(train, dp: int) -> int:
    """Micro-batches per rank per optimizer step (train: the TrainConfig)."""
    return train.global_batch_size // (train.micro_batch_size * dp)


def check_train(t, d, f) -> None:
    """train: step counts, intervals, the objectives (d: the data section, f: the finetune section)."""
    for key in ("max_steps", "micro_batch_size", "global_batch_size", "log_interval", "eval_samples",
                "max_skipped_steps"):
        positive(getattr(t, key), f"train.{key}")
    for key in ("eval_interval", "sample_tokens"):
        positive(getattr(t, key), f"train.{key}", allow_zero=True)
    choice(t.nonfinite, NONFINITE, "train.nonfinite")
    check_objectives(t.objectives, d, f)


def check_batch(t, dp: int, where: str = "") -> None:
    """The global batch splits into micro-batches on every data-parallel rank (`where`: the world size's
    source, said when several world sizes are possible)."""
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(
            f"train.global_batch_size({t.global_batch_size}) is not divisible by "
            f"train.micro_batch_size({t.micro_batch_size}) * data_parallel({dp}) = {t.micro_batch_size * dp}{where}")
