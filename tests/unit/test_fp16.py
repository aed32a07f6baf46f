"""fp16 (dynamic loss scaling) at the object level on CPU: the real DeepSpeed engines at ZeRO-0 and ZeRO-1
around the debug model, with one narrow adaptation named here: DeepSpeed's CPU accelerator says it has no
fp16 (`is_fp16_supported() -> False`, so DeepSpeed refuses the config), while torch's CPU kernels run the
tiny fp16 model; the tests tell DeepSpeed it has. Checked: the loss scale reaches the gradients at ZeRO-0
(DeepSpeed 0.19.8 skips it, see engine/deepspeed_engine.py 6), the logged norm is the true one on both
paths, loss-scale overflows are counted apart from divergence, and the scaler's state survives a
checkpoint round trip."""

import math

import pytest
import torch
from omegaconf import OmegaConf

from gorilla_dist.config import Config
from gorilla_dist.engine import state
from gorilla_dist.metrics import Metrics
from gorilla_dist.train import DivergenceError, NonFiniteGuard, train_step
from test_nonfinite import batch, engine_for, make_engine


@pytest.fixture
def fp16_on_cpu(world1, monkeypatch):
    from deepspeed.accelerator import get_accelerator

    monkeypatch.setattr(get_accelerator(), "is_fp16_supported", lambda: True)
    return world1


def fp16_engine(layout, zero: int, scale_power: int):
    engine, cfg = make_engine(layout, "fp32", zero)
    cfg.precision.dtype, cfg.precision.initial_scale_power = "fp16", scale_power
    cfg.optim.grad_clip = 0.0  # clipping would hide a wrongly scaled update
    return engine_for(cfg, layout), engine


@pytest.mark.parametrize("zero", [0, 1])
def test_the_fp16_step_follows_the_fp32_step_and_logs_the_true_norm(fp16_on_cpu, zero):
    engine, reference = fp16_engine(fp16_on_cpu, zero, scale_power=8)  # reference: the same model in fp32
    assert state.loss_scale(engine._ds) == 256.0 and state.loss_scale(reference._ds) is None
    train_step(engine, [batch(0)]), train_step(reference, [batch(0)])  # (warm-up: the first step's LR is 0)
    start16, start32 = ({k: v.float().clone() for k, v in e.full_state()[0].items()} for e in (engine, reference))
    got, want = train_step(engine, [batch(1)]), train_step(reference, [batch(1)])
    assert not bool(got.skipped) and got.loss_scale == 256.0
    assert float(got.grad_norm) == pytest.approx(float(want.grad_norm), rel=2e-2)  # not 256x
    # the update: without the loss scale in the gradients, ZeRO-0 divides them by 256 and moves far less
    new16, new32 = engine.full_state()[0], reference.full_state()[0]
    step16 = torch.cat([(new16[k].float() - start16[k].float()).flatten() for k in start16])
    step32 = torch.cat([(new32[k].float() - start32[k].float()).flatten() for k in start32])
    assert float(step16.norm()) == pytest.approx(float(step32.norm()), rel=0.05)
    assert torch.nn.functional.cosine_similarity(step16, step32, dim=0) > 0.98


# ZeRO-0's scaler halves at every overflow; ZeRO's waits for a second one in a row (hysteresis 2)
@pytest.mark.parametrize("zero,powers", [(0, [30, 29, 28, 27]), (1, [30, 30, 29, 28])])
def test_an_overflow_lowers_the_scale_and_the_scaler_state_round_trips(fp16_on_cpu, zero, powers):
    engine, _ = fp16_engine(fp16_on_cpu, zero, scale_power=30)  # 2**30: the scaled gradients overflow fp16
    results = [train_step(engine, [batch(i)]) for i in range(3)]
    assert [r.loss_scale for r in results] == [2.0**p for p in powers[:3]]
    assert all(bool(r.skipped) for r in results) and engine.skipped_steps == 3
    assert all(math.isfinite(float(r.loss)) for r in results)  # the loss is fine: the scale was too high
    saved = state.scaler_state(engine._ds)
    assert saved["cur_scale"] == 2.0**powers[3] and saved["cur_iter"] == 3

    fresh, _ = fp16_engine(fp16_on_cpu, zero, scale_power=30)
    state.load_scaler_state(fresh._ds, saved)
    assert state.scaler_state(fresh._ds) == saved
    nxt, again = train_step(engine, [batch(7)]), train_step(fresh, [batch(7)])
    assert nxt.loss_scale == again.loss_scale == 2.0**powers[3]
    assert state.scaler_state(engine._ds) == state.scaler_state(fresh._ds)


def test_overflows_are_counted_apart_from_divergence(world1, tmp_path):
    cfg = OmegaConf.structured(Config)
    cfg.run.dir, cfg.precision.dtype = str(tmp_path), "fp16"
    cfg.train.log_interval, cfg.train.nonfinite, cfg.train.max_skipped_steps = 100, "skip", 0
    cfg.logging.wandb.mode, cfg.logging.progress = "disabled", False
    guard = NonFiniteGuard(cfg.train, world1)
    metrics = Metrics(cfg, world1, flops_per_token=1.0, tokens_per_step=1, start_step=0, on_flush=guard.check_rows)
    one = torch.ones(())
    metrics.step(1, one, 1e-3, float("inf"), skipped=True, loss_scale=2.0**16)  # warm-up overflows
    metrics.step(2, one, 1e-3, float("inf"), skipped=True, loss_scale=2.0**15)
    metrics.step(3, one, 1e-3, 0.5, skipped=False, loss_scale=2.0**14)
    metrics.flush()
    assert guard.overflows == 2 and guard.in_a_row == 0
    metrics.step(4, one * float("nan"), 1e-3, float("nan"), skipped=True, loss_scale=2.0**14)  # a NaN loss
    with pytest.raises(DivergenceError, match="max_skipped_steps=0"):
        metrics.flush()
    guard.in_a_row = 0
    metrics.step(5, one, 1e-3, float("inf"), skipped=True, loss_scale=1.0)  # at the scale's floor: the model's
    with pytest.raises(DivergenceError):
        metrics.flush()
    rows = [line for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert sum('"overflow": true' in row for row in rows) == 2
