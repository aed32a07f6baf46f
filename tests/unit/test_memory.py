"""Memory accounting: state bytes against the exact sizes of each optimizer path, the CPU allocation
tracker against allocations of known size, and activation checkpointing measured to keep less."""

import pytest
import torch
from omegaconf import OmegaConf
from test_nonfinite import REPO, batch, make_engine

from gorilla_dist.config import Config
from gorilla_dist.memory import ActivationPeak, FirstStepProbe
from gorilla_dist.model import build_model
from gorilla_dist.loss import lm_loss
from gorilla_dist.train import train_step


def test_fp32_zero0_state_is_4_bytes_of_weights_4_of_grads_8_of_moments(world1):
    engine, _ = make_engine(world1, "fp32", 0)
    n = sum(p.numel() for p in engine.module.parameters())
    tensors = len(list(engine.module.parameters()))
    assert engine.state_bytes() == {"params": 4 * n, "grads": 0, "optimizer": 0}  # AdamW state is lazy
    probe = FirstStepProbe(engine, world1.device)
    train_step(engine, [batch(1)], probe=probe)
    got = probe.result()
    assert (got["params"], got["grads"]) == (4 * n, 4 * n)
    assert got["optimizer"] == 8 * n + 4 * tensors  # exp_avg + exp_avg_sq, and a 0-d fp32 step each
    assert got["activations_peak"] > 0


def test_bf16_zero0_state_adds_the_fp32_master_copy(world1):
    engine, _ = make_engine(world1, "bf16", 0)
    n = sum(p.numel() for p in engine.module.parameters())
    tensors = len(list(engine.module.parameters()))
    probe = FirstStepProbe(engine, world1.device)
    train_step(engine, [batch(1)], probe=probe)
    got = probe.result()
    assert (got["params"], got["grads"]) == (2 * n, 2 * n)  # bf16 weights, bf16 gradients
    assert got["optimizer"] == 4 * n + 8 * n + 4 * tensors  # fp32 masters + moments + steps


def test_the_cpu_tracker_counts_fresh_storages_not_views_and_uncounts_frees():
    peak = ActivationPeak(torch.device("cpu"))
    kept = []
    with peak.measure():
        a = torch.ones(1 << 20)  # 4 MiB
        b = a.view(2, -1)[0]  # a view: no new memory
        c = torch.ones(1 << 19)  # 2 MiB: peak 6 MiB
        a.add_(1)  # in place: no new memory
        del a, b, c
        kept.append(torch.ones(1 << 18))  # 1 MiB still allocated at the end
    assert peak.bytes == (6 << 20) - (1 << 20)


def model_activation_peak(world1, mode: str) -> int:
    cfg = OmegaConf.structured(Config)
    cfg.model = OmegaConf.merge(cfg.model, OmegaConf.load(REPO / "conf/model/debug.yaml"))
    cfg.model.num_layers, cfg.parallel.activation_checkpointing = 6, mode
    model = build_model(cfg.model, vocab_size=16, dtype="fp32", device=world1.device, seed=1, parallel=cfg.parallel)
    peak = ActivationPeak(world1.device)
    with peak.measure():
        lm_loss(model, batch(1, seq=256)).backward()
    return peak.bytes


def test_activation_checkpointing_keeps_less(world1):
    none, selective, full = (model_activation_peak(world1, m) for m in ("none", "selective", "full"))
    assert full < 0.35 * none  # 6 layers: each keeps only its input
    assert selective < none  # the core attention's softmax statistics and output are recomputed
    assert full < selective


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_checkpointed_gradients_equal_plain_ones(world1, mode):
    cfg = OmegaConf.structured(Config)
    cfg.model = OmegaConf.merge(cfg.model, OmegaConf.load(REPO / "conf/model/debug.yaml"))
    grads = {}
    for m in ("none", mode):
        cfg.parallel.activation_checkpointing = m
        model = build_model(cfg.model, vocab_size=16, dtype="fp32", device=world1.device, seed=1, parallel=cfg.parallel)
        lm_loss(model, batch(1)).backward()
        grads[m] = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert all(torch.allclose(grads["none"][k], grads[mode][k], atol=1e-6) for k in grads["none"])
