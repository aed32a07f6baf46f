"""optim: AdamW and the learning-rate schedule."""

from __future__ import annotations

from dataclasses import dataclass

from gorilla_dist.config.checks import choice, positive
from gorilla_dist.errors import ConfigError

SCHEDULES = ("cosine", "constant")


@dataclass
class OptimConfig:
    lr: float = 1e-3
    """Peak learning rate (after warmup)."""
    min_lr: float = 1e-4
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = 100
    """Linear warmup from 0 to lr over this many optimizer steps."""
    decay_steps: int | None = None
    """Steps of the warmup + decay schedule; None means train.max_steps."""
    schedule: str = "cosine"
    """After warmup: cosine (to min_lr) | constant."""
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8
    weight_decay: float = 0.1
    """AdamW decoupled weight decay; never applied to norms, biases or embeddings."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""


def check_optim(o) -> None:
    for key in ("warmup_steps", "weight_decay", "grad_clip", "lr", "min_lr"):
        positive(getattr(o, key), f"optim.{key}", allow_zero=True)
    choice(o.schedule, SCHEDULES, "optim.schedule")
    if o.min_lr > o.lr:
        raise ConfigError(f"optim.min_lr({o.min_lr}) must not exceed optim.lr({o.lr})")
