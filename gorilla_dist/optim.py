"""Optimizer policy: AdamW with decoupled weight decay on weight matrices only (never on norms, biases
or embeddings), and the learning-rate schedule (linear warmup, then cosine decay to min_lr).
gorilla_dist.engine builds the DeepSpeed engine (ZeRO, precision, clipping, accumulation) from them.
"""

from __future__ import annotations

import math

import torch


def lr_at(step: int, o, max_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based), nanoGPT's schedule: linear warmup over
    warmup_steps, then cosine from lr to min_lr until decay_steps, then min_lr."""
    decay_steps = o.decay_steps or max_steps
    if step < o.warmup_steps:
        return o.lr * (step + 1) / (o.warmup_steps + 1)
    if o.schedule == "constant":
        return o.lr
    if step >= decay_steps:
        return o.min_lr
    ratio = (step - o.warmup_steps) / max(1, decay_steps - o.warmup_steps)
    return o.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (o.lr - o.min_lr)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices of linear layers; none on norms, biases, embeddings (incl. tied output).
    A parameter carrying its own `delta_weight_decay` (the per-layer sharing deltas, model/deltas.py) goes
    to a group with that decay. (A ZeRO-3 model built partitioned: each parameter's own shape, not its
    placeholder's.)"""
    from gorilla_dist.engine.state import logical_shape

    decay, no_decay, own = [], [], {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if hasattr(p, "delta_weight_decay"):
            own.setdefault(p.delta_weight_decay, []).append(p)
        else:
            # (the last pipeline stage's copy of tied embeddings is the embeddings: megatron marks both copies)
            embedding = "embedding" in name or getattr(p, "shared_embedding", False)
            (no_decay if len(logical_shape(p)) < 2 or embedding else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups += [{"params": ps, "weight_decay": wd} for wd, ps in own.items()]
    return [g for g in groups if g["params"]]  # (fine-tuning may leave a kind empty)
