"""Host syncs: the counter sees each kind of sync with its call site, and a training step reads nothing
back to the host between log intervals, for fp32/bf16 x ZeRO 0-3 (engine/on_device.py); emulated bf16 is announced."""

from unittest import mock

import pytest
import torch
from test_nonfinite import batch, make_engine

from gorilla_dist.dtypes import matmul_speed_ratio, precision_notice
from gorilla_dist.engine.syncs import SyncCounter
from gorilla_dist.optim import lr_at
from gorilla_dist.train import train_step


def test_the_counter_sees_each_kind_of_sync_at_its_call_site():
    x = torch.arange(6.0) - 2
    with SyncCounter() as syncs:
        y = (x * 2).sum()  # device work only
    assert syncs.total == 0 and syncs.ops >= 2
    with SyncCounter() as syncs:
        y.item()
        float(y)
        x.tolist()
        if x[0] > 0:
            pass
        x[x > 0]
        x.nonzero()
    kinds = sorted(site.split(" @ ")[0] for site in syncs.sites.elements())
    assert kinds == ["bool_index", "item", "item", "item", "nonzero", "tolist"]
    assert all("test_syncs.py:" in site and "test_the_counter_sees" in site for site in syncs.sites)
    assert syncs.total == 6 and "6 host syncs" in syncs.report()
    # a blocking copy of host data to another device (meta stands in for a GPU here): non_blocking from pageable
    # memory is one too (only a pinned source is asynchronous; pinning needs a GPU: the GPU tests)
    with SyncCounter() as syncs:
        x.to("meta")
        x.to("meta", non_blocking=True)
        x.to(torch.float64)  # (same device)
    assert [site.split(" @ ")[0] for site in syncs.sites.elements()] == ["to_device", "to_device"]


@pytest.mark.parametrize("dtype,zero", [("fp32", 0), ("fp32", 1), ("fp32", 2), ("fp32", 3), ("bf16", 0),
                                        ("bf16", 1), ("bf16", 2), ("bf16", 3)])
def test_a_training_step_reads_nothing_back_to_the_host(world1, dtype, zero):
    """train_step (forward, backward, clipping, the update or its skip, the LR schedule) and the loss,
    grad norm and skip flag it returns: all on the device. (ZeRO-3 records its module trace, with checks
    that read the device, during its first two steps: warmed up first.)"""
    from deepspeed.accelerator import get_accelerator

    engine, cfg = make_engine(world1, dtype, zero)
    for seed in range(3):
        train_step(engine, [batch(seed)])
    device_syncs = []  # what DeepSpeed asks of the device: a no-op on CPU, a stall on a GPU
    with SyncCounter() as syncs, mock.patch.object(get_accelerator(), "synchronize",
                                                   lambda *a, **k: device_syncs.append(1)):
        results = [train_step(engine, [batch(seed)]) for seed in range(3, 5)]
        lr = engine.lr
    assert syncs.total == 0, syncs.report()
    assert not device_syncs  # DeepSpeed's throughput timer is off (deepspeed_config "timers")
    assert all(torch.is_tensor(r.skipped) and not r.skipped for r in results)
    assert float(lr) == pytest.approx(lr_at(5, cfg.optim, cfg.train.max_steps), rel=1e-6)  # after 5 applied steps
    assert engine.skipped_steps == 0 and all(torch.isfinite(r.loss) and torch.isfinite(r.grad_norm) for r in results)


def test_emulated_bf16_is_announced_with_the_measured_ratio():
    cpu = torch.device("cpu")
    line = precision_notice("bf16", cpu, ratio=lambda dtype, device: 0.02)
    assert "0.02x the speed of fp32" in line and "precision=fp32 will train faster" in line
    assert precision_notice("bf16", cpu, ratio=lambda dtype, device: 2.3) is None  # native: nothing to say
    assert precision_notice("fp32", cpu, ratio=lambda dtype, device: 0.0) is None
    assert precision_notice("bf16", torch.device("cuda"), ratio=lambda dtype, device: 0.0) is None
    assert matmul_speed_ratio("bf16", cpu, n=32, reps=1) > 0  # the real measurement runs


def test_the_loop_counts_only_quiet_steps_after_warm_up():
    from gorilla_dist.engine.syncs import LoopSyncs

    x = torch.ones(3)
    loop = LoopSyncs(True, first_step=10, warmup=3)
    for step, quiet in ((11, True), (13, True), (14, False), (15, True), (16, True)):
        with loop.counting(step, quiet):
            x.sum().item()
    report = loop.report()
    assert report["steps_counted"] == 2 and report["per_step"] == 1.0  # steps 15 and 16
    assert list(report["sites"]) == [next(iter(report["sites"]))] and "test_syncs.py" in next(iter(report["sites"]))
    off = LoopSyncs(False, first_step=0)
    with off.counting(5, True):
        x.sum().item()
    assert off.report() is None


def test_cuda_processes_get_tf32_and_megatrons_queue_setting(monkeypatch):
    """precision.tf32 sets torch's TF32 flags on CUDA; tensor parallelism asks for CUDA_DEVICE_MAX_CONNECTIONS=1
    (unless the user set it); a CPU process is left as it is. (Applied before the first kernel; checked on
    torch's flags and the environment, which need no GPU.)"""
    from types import SimpleNamespace

    from gorilla_dist.dtypes import device_settings

    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    monkeypatch.delenv("CUDA_DEVICE_MAX_CONNECTIONS", raising=False)
    try:
        assert device_settings(SimpleNamespace(tf32=True), SimpleNamespace(tp=2), torch.device("cpu")) == {}
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == flags
        env = device_settings(SimpleNamespace(tf32=True), SimpleNamespace(tp=2), torch.device("cuda", 0))
        assert env == {"CUDA_DEVICE_MAX_CONNECTIONS": "1"} and torch.backends.cuda.matmul.allow_tf32
        monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "8")
        assert device_settings(SimpleNamespace(tf32=False), SimpleNamespace(tp=2), torch.device("cuda", 0)) == {}
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert device_settings(SimpleNamespace(tf32=True), SimpleNamespace(tp=1), torch.device("cuda", 0)) == {}
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def test_the_cpu_rng_patches_are_undone_for_a_cuda_model(world1):
    """seed_rng_tracker on CPU replaces megatron's tracker fork and its get/set-all-states functions; a CUDA
    model built later in the same process gets megatron's own back (undo_cpu_patches, run first on CUDA)."""
    import megatron.core.tensor_parallel.random as mrandom

    from gorilla_dist.engine.rng import seed_rng_tracker, undo_cpu_patches

    def megatrons():
        return all(f.__module__ == mrandom.__name__ and f.__name__ == name for f, name in (
            (mrandom._get_all_rng_states, "_get_all_rng_states"), (mrandom._set_all_rng_states, "_set_all_rng_states")))

    tracker = mrandom.get_cuda_rng_tracker()
    seed_rng_tracker(1, torch.device("cpu"))
    seed_rng_tracker(2, torch.device("cpu"))  # (twice: what is kept is still megatron's)
    assert "fork" in tracker.__dict__ and not megatrons()
    undo_cpu_patches()
    assert "fork" not in tracker.__dict__ and megatrons()
    seed_rng_tracker(1, torch.device("cpu"))  # the other tests' CPU models
