"""Pipeline parallelism (parallel.pp): a two-stage step computes every gradient of the one-stage model (2 gloo
ranks, the real engine: 1F1B tied on an uneven split, fp16, the interleaved schedule untied). Through the launcher: the
matrix rows pp2-accum4 (tied embeddings), dp2xpp2-zero1-accum3 and tp2xpp2-sp-zero1-ckpt_full and the resumes
between pipeline and other layouts are in test_parity.py, two Slurm nodes in test_multinode.py, the refusals in
tests/unit/test_config.py."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
FP16_TOL = 2e-4  # fp16 gradients: measured 6.1e-5 (one fp16 step at 0.08) on values up to 0.08


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def step_gradients(out: Path, *overrides: str, stages: int = 1, dim: str = "pp") -> dict[str, torch.Tensor]:
    """pipeline_grads.py in one process, or on `stages` ranks with parallel.pp=stages (`dim`: or tp):
    {name: gradient} (with tp, the first rank's)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(HERE)]), "OMP_NUM_THREADS": "1"}
    script = [str(HERE / "pipeline_grads.py"), str(out), *overrides]
    if stages == 1:
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        command = [sys.executable, *script]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={stages}",
                   f"--master_port={free_port()}", *script, f"parallel.{dim}={stages}"]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    grads = {}
    for rank in range(stages if dim == "pp" else 1):
        for name, g in load_file(str(out) + f".rank{rank}.safetensors").items():
            assert name not in grads or name.startswith("__"), f"two stages wrote {name}"
            grads.setdefault(name, g)
    return grads


@pytest.mark.parametrize("model, tol", [
    (["model.tie_embeddings=true", "parallel.pp_layers=[1,3]"], 1e-7),
    (["model.num_layers=5", "model.tie_embeddings=false", "parallel.pp_schedule=interleaved", "parallel.pp_virtual=2",
      "parallel.pp_layers=[2,1,1,1]", "parallel.activation_checkpointing=full"], 1e-7),
    # fp16 (ZeRO-0, dynamic loss scale): the gradients a stage receives carry the loss scale already; the
    # norm counts the tied copy once (deepspeed_engine.py 7: measured 1.0401 against 1.0401 in one process)
    (["precision.dtype=fp16", "precision.initial_scale_power=12"], FP16_TOL),
], ids=["tied-uneven_1_3", "interleaved_v2-untied-uneven-ckpt_full", "fp16-tied"])
def test_every_gradient_of_a_two_stage_step_is_the_one_stage_gradient(tmp_path, model, tol):
    want = step_gradients(tmp_path / "one", *[o for o in model if not o.startswith("parallel.")])
    got = step_gradients(tmp_path / "two", *model, stages=2)
    assert sorted(got) == sorted(want)
    want_norm = want["__grad_norm__"].item()
    assert abs(got.pop("__loss__") - want.pop("__loss__")).item() < 1e-6
    # the norm DeepSpeed clips with (summed over the stages, the tied copy counted once)
    assert abs(got.pop("__grad_norm__") - want.pop("__grad_norm__")).item() < (1e-5 if tol < 1e-6 else 1e-4) * want_norm
    for name, g in want.items():
        assert (got[name] - g).abs().max().item() <= tol, name
        assert g.abs().max() > 0, name  # every parameter takes part


def test_the_fp16_zero0_gradient_norm_counts_every_tensor_parallel_rank(tmp_path):
    """Not a pipeline matter, found with it (deepspeed_engine.py 7): FP16_UnfusedOptimizer's norm of the bare
    gradients left out the gradients of tensor-parallel ranks > 0 (measured 0.885 against 1.040 in one process;
    clipping used it). TP=2, fp16 at ZeRO-0: the one-process norm (measured 1.04008 against 1.04013)."""
    fp16 = ["precision.dtype=fp16", "precision.initial_scale_power=12"]
    want = step_gradients(tmp_path / "one", *fp16)["__grad_norm__"].item()
    got = step_gradients(tmp_path / "tp2", *fp16, stages=2, dim="tp")["__grad_norm__"].item()
    assert abs(got - want) < 1e-4 * want, (got, want)
