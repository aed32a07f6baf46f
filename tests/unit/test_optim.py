"""LR schedule and weight-decay groups."""

import math

import pytest
import torch
from omegaconf import OmegaConf

from gorilla_dist.config import OptimConfig
from gorilla_dist.engine.deepspeed_engine import deepspeed_config
from gorilla_dist.optim import lr_at, param_groups


def nanogpt_lr(it, lr=1e-3, min_lr=1e-4, warmup=100, decay=2000):
    """nanoGPT train.py get_lr, verbatim logic."""
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    if it > decay:
        return min_lr
    ratio = (it - warmup) / (decay - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


@pytest.mark.parametrize("step", [0, 1, 50, 99, 100, 101, 500, 1000, 1999, 2000, 2500])
def test_schedule_matches_nanogpt(step):
    o = OmegaConf.structured(OptimConfig)
    assert lr_at(step, o, 2000) == pytest.approx(nanogpt_lr(step), rel=1e-12)


def test_constant_schedule_and_explicit_decay_steps():
    o = OmegaConf.merge(OmegaConf.structured(OptimConfig), {"schedule": "constant"})
    assert lr_at(150, o, 2000) == 1e-3
    o = OmegaConf.merge(OmegaConf.structured(OptimConfig), {"decay_steps": 300})
    assert lr_at(300, o, 2000) == o.min_lr and lr_at(200, o, 2000) == pytest.approx(nanogpt_lr(200, decay=300))


def test_no_weight_decay_on_norms_biases_embeddings():
    model = torch.nn.ModuleDict({"embedding": torch.nn.Embedding(10, 4), "proj": torch.nn.Linear(4, 4),
                                 "norm": torch.nn.LayerNorm(4)})
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert len(no_decay["params"]) == 4  # embedding, linear bias, norm weight and bias


def test_deepspeed_config_accumulation_and_precision():
    from gorilla_dist.config import Config

    cfg = OmegaConf.structured(Config)
    cfg.train.global_batch_size, cfg.train.micro_batch_size = 32, 4
    cfg.precision.dtype, cfg.parallel.zero_stage = "bf16", 3
    ds = deepspeed_config(optim=cfg.optim, train=cfg.train, zero_stage=cfg.parallel.zero_stage,
                          precision=cfg.precision, dp=2)
    assert ds["gradient_accumulation_steps"] == 4 and ds["train_batch_size"] == 32
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"] and ds["zero_optimization"]["stage"] == 3
    assert ds["timers"] == {"throughput": {"enabled": False, "synchronized": False}}  # no device sync per step
