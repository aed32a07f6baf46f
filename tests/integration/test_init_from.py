"""checkpoint.init_from: a new run starts from another run's weights (any layout), with a fresh optimizer,
schedule and data order; its own checkpoints take precedence when it is restarted; mismatches are refused."""

import shutil

import pytest
from helpers import check, launch, losses, metrics

BASE = ["model=debug", "checkpoint.interval=10"]
FROZEN = ["optim.lr=0", "optim.min_lr=0", "train.max_steps=1", "train.eval_interval=1", "train.eval_samples=24"]
LAYOUTS = {"local": [], "torchrun-tp2-zero1": ["launch=torchrun", "launch.nproc_per_node=2", "parallel.tp=2",
                                               "parallel.zero_stage=1"]}


def val_losses(run) -> dict[int, float]:
    return {r["step"]: r["val_loss"] for r in metrics(run) if "val_loss" in r}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    run = tmp_path_factory.mktemp("init_from") / "source"
    check(launch(run, *BASE, "train.max_steps=10", "train.eval_interval=10", "train.eval_samples=24"))
    return run


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_new_run_holds_the_source_weights(source, tmp_path, layout):
    """With lr=0 the first step changes nothing, so the new run's validation loss is the source's."""
    out = check(launch(tmp_path / "run", *BASE, *FROZEN, f"checkpoint.init_from={source}", *LAYOUTS[layout]))
    assert f"weights from {source / 'checkpoints' / 'step_00000010'}" in out
    assert val_losses(tmp_path / "run")[1] == pytest.approx(val_losses(source)[10], rel=1e-5)


def test_fine_tuning_starts_low_and_a_restart_resumes_itself(source, tmp_path):
    run = tmp_path / "run"
    ckpt = tmp_path / "step_00000010"  # a copy of the source's checkpoint, deleted before the restart
    shutil.copytree(source / "checkpoints" / "step_00000010", ckpt)
    check(launch(run, *BASE, "train.max_steps=10", f"checkpoint.init_from={ckpt}"))
    fresh, tuned = losses(source), losses(run)
    assert all(tuned[s] < fresh[s] - 0.05 for s in range(1, 11))  # the same batches, from trained weights
    shutil.rmtree(ckpt)  # the restart needs only its own checkpoints
    out = check(launch(run, *BASE, "train.max_steps=15", f"checkpoint.init_from={ckpt}"))
    assert f"resumed from {run / 'checkpoints' / 'step_00000010'} at step 10" in out and "weights from" not in out


def test_mismatches_are_refused(source, tmp_path):
    proc = launch(tmp_path / "a", *BASE, f"checkpoint.init_from={tmp_path / 'nowhere'}")
    assert proc.returncode == 2 and f"checkpoint.init_from='{tmp_path / 'nowhere'}': no such directory" in proc.stdout
    proc = launch(tmp_path / "b", *BASE, "model.hidden_size=32", f"checkpoint.init_from={source}")
    assert proc.returncode == 1 and "checkpoint.init_from: " in proc.stdout and "model.safetensors" in proc.stdout
    proc = launch(tmp_path / "c", *BASE, "data.tokenizer=byte", f"checkpoint.init_from={source}")
    assert proc.returncode == 1 and "its run was trained with another tokenizer" in proc.stdout
    assert not (tmp_path / "c" / "checkpoints").exists() or not any((tmp_path / "c" / "checkpoints").iterdir())
