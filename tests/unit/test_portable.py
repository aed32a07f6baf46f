"""Layout-free checkpoints in one process: every optimizer path (torch AdamW, DeepSpeed's unfused
bf16, BF16_Optimizer, ZeRO 1/2/3) hands out and takes back exactly the same state, loading never
unpickles, and a checkpoint of another model is refused with the mismatch named."""

import pickle
import subprocess
import sys

import pytest
import torch
from test_nonfinite import batch, engine_for, make_engine

from gorilla_dist.checkpoint import Checkpointer, checkpoint_moments, checkpoint_weights, complete_checkpoints
from gorilla_dist.errors import CheckpointError
from gorilla_dist.train import train_step

PATHS = [("fp32", 0), ("fp32", 1), ("fp32", 2), ("fp32", 3), ("bf16", 0), ("bf16", 1), ("bf16", 2), ("bf16", 3)]


@pytest.mark.parametrize("dtype,zero", PATHS)
def test_state_round_trip_continues_bitwise(world1, tmp_path, dtype, zero):
    """Train 2 steps, move the full state into a fresh engine: the next step is bitwise the same. The
    checkpoint's shards (each rank's own parts, engine.local_state) join into exactly that state."""
    trained, cfg = make_engine(world1, dtype, zero, run_dir=tmp_path)
    for i in range(2):
        train_step(trained, [batch(i)])
    weights, moments, bad = trained.full_state()
    assert not bad and trained.optimizer_step_count() == 2
    cfg.checkpoint.consolidated = "false"
    ckpt = Checkpointer(cfg, world1).save(2, trained, {})
    assert not (ckpt / "model.safetensors").exists() and not (ckpt / "optimizer.safetensors").exists()
    shard_w, shard_m = checkpoint_weights(ckpt), checkpoint_moments(ckpt)
    assert shard_w.keys() == weights.keys() and shard_m.keys() == moments.keys()
    assert all(torch.equal(weights[k], shard_w[k]) for k in weights)
    assert all(torch.equal(moments[k], shard_m[k]) for k in moments)
    assert all(w.dtype == torch.float32 for w in weights.values())
    assert all(moments[f"{name}.exp_avg_sq"].abs().sum() > 0 for name in weights)  # real moments, not zeros

    fresh, _ = make_engine(world1, dtype, zero)
    fresh.load_full_state(weights, moments, trained.schedule_state())
    assert fresh.lr == trained.lr and fresh.global_steps == trained.global_steps == 2
    again_w, again_m, _ = fresh.full_state()
    assert all(torch.equal(weights[k], again_w[k]) for k in weights)
    assert all(torch.equal(moments[k], again_m[k]) for k in moments)

    a, b = train_step(trained, [batch(5)]), train_step(fresh, [batch(5)])
    assert a.loss.item() == b.loss.item()
    after_a, after_b = trained.full_state()[0], fresh.full_state()[0]
    assert all(torch.equal(after_a[k], after_b[k]) for k in after_a)


def test_bf16_zero0_starts_like_the_other_stages(world1):
    """DeepSpeed's unfused bf16 optimizer runs a zero-gradient step at start; it is undone, so AdamW's
    step count starts at 0 and its updates are ZeRO-1's."""
    z0, _ = make_engine(world1, "bf16", 0)
    z1, _ = make_engine(world1, "bf16", 1)
    assert z0.optimizer_step_count() == 0
    for e in (z0, z1):
        for i in range(4):
            train_step(e, [batch(i)])
    w0, w1 = z0.full_state()[0], z1.full_state()[0]
    worst = max((w0[k] - w1[k]).abs().max().item() for k in w0)
    assert worst < 1e-5, worst  # measured: 6e-8 (fp32 vs bf16 gradient accumulation); 1.3e-3 without the fix


def test_loading_a_checkpoint_never_unpickles(world1, tmp_path, monkeypatch):
    engine, cfg = make_engine(world1, "bf16", 2, run_dir=tmp_path)
    train_step(engine, [batch(1)])
    ckpt = Checkpointer(cfg, world1).save(1, engine, {"position": 12})
    assert not [f for f in ckpt.rglob("*") if f.suffix in (".pt", ".pkl", ".bin")]

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint load unpickled something")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    fresh, _ = make_engine(world1, "bf16", 2, run_dir=tmp_path)
    trainer = Checkpointer(cfg, world1).load(ckpt, fresh)
    assert trainer["step"] == 1 and trainer["data"] == {"position": 12}
    want, got = engine.full_state()[0], fresh.full_state()[0]
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_a_checkpoint_of_another_model_is_refused_by_name_and_shape(world1, tmp_path):
    engine, cfg = make_engine(world1, "fp32", 0, run_dir=tmp_path)
    ckpt = Checkpointer(cfg, world1).save(1, engine, {})
    cfg.model.hidden_size = 32
    other = engine_for(cfg, world1)
    with pytest.raises(CheckpointError, match=r"embedding.word_embeddings.weight has shape \(128, 64\), this "
                                              r"model's is \(128, 32\); was it written with another model config"):
        Checkpointer(cfg, world1).load(ckpt, other)
    assert complete_checkpoints(tmp_path / "checkpoints") == [ckpt]  # untouched


def test_consolidate_refuses_to_overwrite_and_names_bad_values(tmp_path):
    out = tmp_path / "model.safetensors"
    out.write_bytes(b"keep me")

    def run(*args):
        return subprocess.run([sys.executable, "-m", "gorilla_dist.checkpoint", *args], capture_output=True,
                              text=True)

    proc = run("consolidate", f"run.dir={tmp_path}", f"out={out}")
    assert proc.returncode == 1 and f"out={out} already exists; not overwriting it" in proc.stderr
    assert out.read_bytes() == b"keep me"
    proc = run("consolidate", f"run.dir={tmp_path}", f"out={tmp_path / 'x.safetensors'}", "dtype=int8")
    assert proc.returncode == 1 and "dtype='int8' is not valid; choose one of: fp32, bf16, fp16" in proc.stderr
    proc = run("consolidate", f"run.dir={tmp_path}", f"out={tmp_path / 'x.safetensors'}")
    assert proc.returncode == 2 and f"run.dir={tmp_path} is not a run directory (no config.yaml" in proc.stderr
    (tmp_path / "config.yaml").write_text("run:\n  dir: x\n")
    proc = run("consolidate", f"run.dir={tmp_path}", f"out={tmp_path / 'x.safetensors'}")
    assert proc.returncode == 1 and f"no complete checkpoint under {tmp_path / 'checkpoints'}" in proc.stderr
    proc = run("export")
    assert proc.returncode == 1 and "usage: python -m gorilla_dist.checkpoint consolidate" in proc.stderr


def test_consolidate_casts_to_bf16_and_fp16_exactly_as_torch_does(world1, tmp_path):
    """consolidate dtype=bf16|fp16 holds the fp32 masters cast by torch (round to nearest even), nothing else
    changed: names, shapes, the step and the config in its metadata."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from gorilla_dist.checkpoint.__main__ import ConsolidateArgs, consolidate

    engine, cfg = make_engine(world1, "fp32", 0, run_dir=tmp_path)
    train_step(engine, [batch(1)])
    ckpt = Checkpointer(cfg, world1).save(1, engine, {})
    (ckpt.parent.parent / "config.yaml").write_text((ckpt / "config.yaml").read_text())
    files = {}
    for dtype in ("fp32", "bf16", "fp16"):
        files[dtype] = tmp_path / f"{dtype}.safetensors"
        consolidate(ConsolidateArgs(run_dir=str(tmp_path), out=str(files[dtype]), dtype=dtype))
    whole = load_file(str(files["fp32"]))
    assert whole.keys() == engine.full_state()[0].keys()
    assert all(torch.equal(whole[k], v) for k, v in engine.full_state()[0].items())
    for dtype, torch_dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        cast = load_file(str(files[dtype]))
        assert cast.keys() == whole.keys()
        assert all(cast[k].dtype == torch_dtype and torch.equal(cast[k], whole[k].to(torch_dtype)) for k in whole)
        assert any(not torch.equal(cast[k].float(), whole[k]) for k in whole)  # it did round
        with safe_open(str(files[dtype]), "pt") as f:
            assert f.metadata()["dtype"] == dtype and f.metadata()["step"] == "1"
