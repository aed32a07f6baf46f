"""README claims with no other test: the named model sizes compose and validate; checkpoint.consolidated=auto's
2 GiB threshold; the launcher never imports torch; a sweep with a failing job exits 1. None starts a worker."""

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
from helpers import REPO, composed

from gorilla_dist.config import validate


@pytest.mark.parametrize("size,layers,hidden,vocab,matmul_params", [
    ("gpt2-124m", 12, 768, 50257, (120e6, 128e6)),  # GPT-2 small: 124M with its vocabulary
    ("1b", 16, 2048, 32000, (0.75e9, 1.0e9)),  # Llama-style, untied: ~0.85B matmul + 65M input embedding
])
def test_named_sizes_compose_validate_and_have_their_size(size, layers, hidden, vocab, matmul_params):
    from gorilla_dist.model.spec import flops_per_token

    cfg = composed(f"model={size}")
    validate(cfg)
    m = cfg.model
    assert (m.num_layers, m.hidden_size) == (layers, hidden)
    params = (flops_per_token(m, vocab) - 12.0 * m.num_layers * m.hidden_size * m.seq_length) / 6  # the matmuls
    assert matmul_params[0] <= params <= matmul_params[1], params


def test_consolidated_auto_writes_model_safetensors_up_to_2_gib_of_fp32_weights():
    from gorilla_dist.checkpoint import CONSOLIDATE_AUTO_BYTES, Checkpointer

    assert CONSOLIDATE_AUTO_BYTES == 2 * 2**30

    def shards(*shapes):  # what _consolidate reads of a ShardedTensors
        slices = {f"w{i}": SimpleNamespace(get_shape=lambda s=s: list(s)) for i, s in enumerate(shapes)}
        return SimpleNamespace(keys=slices.keys, get_slice=slices.__getitem__)

    def writes(mode, *shapes):
        return Checkpointer._consolidate(SimpleNamespace(cfg=composed(f"checkpoint.consolidated={mode}")),
                                         shards(*shapes))

    assert writes("auto", (2**28,), (2**14, 2**14))  # 2**29 fp32 numbers: exactly 2 GiB
    assert not writes("auto", (2**28,), (2**14, 2**14), (1,))  # one more
    assert writes("true", (2**30,)) and not writes("false", (1,))


def test_the_launcher_never_imports_torch(tmp_path):
    """The whole launcher path up to starting workers (compose, validate, write run.dir, render the job
    script), run with -X importtime, and every launcher module imported: no torch."""
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "launcher", f"run.dir={run}", "model=debug",
                           "launch=slurm", "slurm.submit=false"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert {"launcher.slurm", "gorilla_dist.config", "hydra"} <= imported  # it looked at the launcher's imports
    assert not {m for m in imported if m == "torch" or m.startswith("torch.")}
    assert (run / "train.sbatch").is_file()
    code = ("import sys, launcher.__main__, launcher.backends, launcher.slurm, launcher.sweep\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'deepspeed', 'megatron')))")
    mods = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert mods.returncode == 0 and mods.stdout.strip() == "[]", mods.stdout + mods.stderr


def test_a_sweep_with_a_failing_job_exits_1(tmp_path):
    """Two jobs that start no worker (slurm.submit=false): one writes its job script, one is refused."""
    sweep = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, "-m", "launcher", "-m", "model=debug", "launch=slurm", "slurm.submit=false",
                           "slurm.time=01:00:00,4h", f"hydra.sweep.dir={sweep}"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "[sweep] job(s) [1] failed" in proc.stderr
    jobs = json.loads((sweep / "sweep.json").read_text())["jobs"]
    assert [j["status"] for j in jobs] == [0, 2]
    assert (sweep / "0" / "train.sbatch").is_file() and not (sweep / "1" / "train.sbatch").exists()
