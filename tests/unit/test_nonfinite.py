"""The NaN/inf guard on every optimizer path (fp32/bf16, ZeRO 0-3): a step with a non-finite loss
changes nothing (weights, optimizer state, LR schedule), the next good step is exactly the one it would
have been, and a model with non-finite weights is never saved."""

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from gorilla_dist.checkpoint import Checkpointer
from gorilla_dist.config import Config
from gorilla_dist.data.loader import pack
from gorilla_dist.errors import CheckpointError
from gorilla_dist.model import build_model
from gorilla_dist.engine import StepResult, build_engine
from gorilla_dist.loss import lm_loss
from gorilla_dist.train import train_step

REPO = Path(__file__).resolve().parents[2]


def make_engine(layout, dtype: str, zero: int, run_dir: Path | None = None):
    cfg = OmegaConf.structured(Config)
    cfg.model = OmegaConf.merge(cfg.model, OmegaConf.load(REPO / "conf/model/debug.yaml"))
    cfg.precision.dtype, cfg.parallel.zero_stage = dtype, zero
    cfg.train.global_batch_size = cfg.train.micro_batch_size = 2
    cfg.optim.warmup_steps = 5  # the LR changes every step, so a wrongly advanced schedule shows
    if run_dir is not None:
        cfg.run.dir = str(run_dir)
    return engine_for(cfg, layout), cfg


def engine_for(cfg, layout):
    """The engine of config `cfg` (a 16-id vocabulary, seed 1): e.g. after a test changed its model."""
    model = build_model(cfg.model, vocab_size=16, dtype=cfg.precision.dtype, device=layout.device, seed=1)
    return build_engine(model, optim=cfg.optim, train=cfg.train, parallel=cfg.parallel, precision=cfg.precision,
                        layout=layout)


def batch(seed: int, seq: int = 32):
    tokens = np.random.default_rng(seed).integers(0, 15, (2, seq + 1))
    return pack(tokens, np.array([seq + 1, seq + 1]), np.array([0, 0]), eod=15, reset_at_eod=False)


def weights(engine, zero: int) -> dict[str, torch.Tensor]:
    return engine.full_state()[0]


def assert_bad_step_skipped(world1, dtype: str, zero: int, bad_step) -> StepResult:
    """Two identical engines take a good step; `bad_step(engine)` then runs on one of them only. It must
    change nothing (weights, optimizer state, LR schedule), and the next good step must be exactly the
    reference's, as if the bad step never happened. Returns the bad step's StepResult."""
    engine, _ = make_engine(world1, dtype, zero)
    reference, _ = make_engine(world1, dtype, zero)
    for e in (engine, reference):
        train_step(e, [batch(1)])
    before, lr_before = weights(engine, zero), engine.lr

    result = bad_step(engine)
    assert result.skipped and engine.skipped_steps == 1 and reference.skipped_steps == 0
    after = weights(engine, zero)
    assert all(torch.equal(before[k], after[k]) for k in before)  # no update at all
    assert engine.lr == lr_before  # the schedule did not advance

    for e in (engine, reference):
        train_step(e, [batch(3)])
    got, want = weights(engine, zero), weights(reference, zero)
    assert all(torch.equal(got[k], want[k]) for k in want)  # as if the bad step never happened
    assert engine.lr == reference.lr
    assert all(torch.isfinite(w).all() for w in got.values())
    return result


@pytest.mark.parametrize("dtype,zero", [("fp32", 0), ("fp32", 1), ("fp32", 2), ("fp32", 3), ("bf16", 0),
                                        ("bf16", 1), ("bf16", 2), ("bf16", 3)])
def test_a_nan_step_changes_nothing_and_the_next_step_is_unaffected(world1, dtype, zero):
    result = assert_bad_step_skipped(world1, dtype, zero, lambda e: train_step(e, [batch(2)], poison=True))
    assert not torch.isfinite(result.loss)


class InfGradient(torch.autograd.Function):
    """Identity forward, inf backward: a finite loss whose gradient overflows."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


@pytest.mark.parametrize("dtype,zero", [("fp32", 0), ("fp32", 2), ("bf16", 0), ("bf16", 1), ("bf16", 3)])
def test_a_finite_loss_with_an_inf_gradient_is_skipped_too(world1, dtype, zero):
    result = assert_bad_step_skipped(
        world1, dtype, zero, lambda e: e.step([batch(2)], lambda model, b: InfGradient.apply(lm_loss(model, b))))
    assert torch.isfinite(result.loss)


def test_a_model_with_nan_weights_is_never_saved(world1, tmp_path):
    engine, cfg = make_engine(world1, "fp32", 0, run_dir=tmp_path)
    ckpt = Checkpointer(cfg, world1)
    ckpt.save(1, engine, {"step": 1})
    with torch.no_grad():
        next(engine.module.parameters()).view(-1)[0] = float("inf")
    with pytest.raises(CheckpointError, match=r"step 2: the model has non-finite \(inf/NaN\) weights in 1 tensors"):
        ckpt.save(2, engine, {"step": 2})
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000001"]
