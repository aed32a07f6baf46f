"""Fine-tuning methods, applied to the built model before the engine is built, so DeepSpeed sees only
the trainable parameters: a frozen one (requires_grad False) is in no optimizer group, has no gradient,
no fp32 master and no optimizer state at any ZeRO stage (ZeRO-3 still partitions its weight).

    full    every parameter trains (the default; checkpoints hold the whole model)
    freeze  finetune.trainable / finetune.frozen select parameters by regular expressions searched in
            their single-process names; checkpoints hold the trainable ones only (checkpoint/)
"""

from __future__ import annotations

import re

import torch

from gorilla_dist.config import FinetuneConfig
from gorilla_dist.engine.state import expert_names, full_shape
from gorilla_dist.errors import ConfigError


def adapter_checkpoints(f: FinetuneConfig) -> bool:
    """Checkpoints hold the trainable parameters only, beside the identity of the base checkpoint."""
    return f.method != "full"


def apply_finetune(model: torch.nn.Module, f: FinetuneConfig) -> str | None:
    """Freeze what `f` says; returns a one-line summary (None for method=full)."""
    if f.method == "full":
        return None
    key, patterns = ("trainable", f.trainable) if f.trainable else ("frozen", f.frozen)
    regexes = [re.compile(p) for p in patterns]
    params = list(model.named_parameters())
    names = {name: expert_names(model, name, p) for name, p in params}  # all EP ranks' names (experts)
    every = [n for ns in names.values() for n in ns]
    for pattern, regex in zip(patterns, regexes):
        if not any(regex.search(n) for n in every):
            raise ConfigError(f"finetune.{key}: {pattern!r} matches no parameter; names look like "
                              f"{every[:2] + every[-2:]} ({len(every)} in all)")
    trained = total = 0
    for name, p in params:
        hits = {any(r.search(n) for r in regexes) for n in names[name]}
        if len(hits) > 1:
            raise ConfigError(f"finetune.{key} selects some of the experts that {name} holds on different "
                              "expert-parallel ranks but not others; select all experts of a layer or none, or use "
                              "parallel.ep=1")
        hit = hits.pop()
        p.requires_grad_(hit if key == "trainable" else not hit)
        count = len(names[name]) * int(torch.Size(full_shape(model, name, p)).numel())
        total += count
        trained += count if p.requires_grad else 0
    if not trained:
        raise ConfigError(f"finetune.{key}={list(patterns)} leaves no parameter to train")
    n_train = sum(p.requires_grad for _, p in params)
    return (f"freeze: {n_train} of {len(params)} tensors train, {trained:,} of {total:,} parameters "
            f"({100 * trained / total:.2f}%)")
