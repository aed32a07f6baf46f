"""Crashes, signals, NaNs and hangs, through the real launcher. The reference is one uninterrupted
run; every interrupted run must end with exactly its losses (bitwise on one rank)."""

import os
import signal
import socket
import subprocess
import time

import pytest
from helpers import REPO, check, launch, launcher_args, losses, metrics

COMMON = ["optim.warmup_steps=2", "optim.decay_steps=40", "checkpoint.keep=0", "train.max_steps=40",
          "checkpoint.interval=20"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    run = tmp_path_factory.mktemp("straight") / "run"
    check(launch(run, *COMMON))
    return losses(run)


@pytest.mark.parametrize("point", ["checkpoint.begin", "checkpoint.engine_saved", "checkpoint.weights_saved",
                                   "checkpoint.manifest_written", "checkpoint.renamed"])
def test_kill_9_while_writing_a_checkpoint_then_a_restart_resumes_from_the_newest_complete_one(
        tmp_path, straight, point):
    run = tmp_path / "run"
    crashed = launch(run, *COMMON, env={"GORILLA_FAULT": f"kill:{point}@40"})
    assert crashed.returncode == 128 + signal.SIGKILL, crashed.stdout[-3000:]
    out = check(launch(run, *COMMON))
    if point == "checkpoint.renamed":  # the step-40 checkpoint was complete: nothing left to train
        assert "at step 40" in out
    else:
        assert "ignoring" in out and ".tmp-step_00000040: an interrupted save" in out
        assert "step_00000020 at step 20" in out
        assert "removing" in out and "left by an interrupted save of the same step" in out
    assert losses(run) == straight
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000020", "step_00000040"]


def test_kill_9_of_one_rank_of_two_during_a_checkpoint(tmp_path, straight):
    run = tmp_path / "run"
    two = ["launch=torchrun", "launch.nproc_per_node=2", "parallel.zero_stage=1"]
    start = time.monotonic()
    crashed = launch(run, *COMMON, *two, "parallel.census_grace_s=2",
                     env={"GORILLA_FAULT": "kill:checkpoint.engine_saved@40/1"})
    # the survivor exits 69 (a peer was lost); torchrun reports it and exits 1, as for any failed worker
    assert crashed.returncode == 1 and "exitcode  : 69" in crashed.stdout, crashed.stdout[-3000:]
    # the survivor names the failed collective and the cause at once, not after parallel.timeout_s (600 s):
    # the next collective after the kill point is the all_gather of what each rank wrote
    host = socket.gethostname()
    assert f"[rank 0 on {host}] error: all_gather failed" in crashed.stdout, crashed.stdout[-3000:]
    assert "a peer rank closed its connection (it crashed or was killed; see its log)" in crashed.stdout
    # the census through the rendezvous store names the rank that no longer answers
    assert f"not answering within 2 s (dead, stuck or unreachable): rank 1 on {host}" in crashed.stdout
    assert time.monotonic() - start < 300
    out = check(launch(run, *COMMON, *two))
    assert "step_00000020 at step 20" in out
    got = losses(run)
    assert got.keys() == straight.keys()
    assert all(got[s] == pytest.approx(straight[s], rel=1e-5) for s in got)  # dp=2 vs 1 rank: float sums


def test_sigusr1_stops_at_a_step_boundary_saves_and_the_restart_continues_exactly(tmp_path, straight):
    run = tmp_path / "run"
    proc = subprocess.Popen(launcher_args(run, *COMMON, "checkpoint.interval=0"), cwd=REPO,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    while not (run / "metrics.jsonl").is_file() or len(metrics(run)) < 1:  # step 5 logged
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.05)
    logged = max(r["step"] for r in metrics(run))  # the run is at this step or up to log_interval - 1 past it
    proc.send_signal(signal.SIGUSR1)  # a preemption warning, as Slurm's --signal=USR1@<s> sends
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, out[-3000:]
    stopped = [p.name for p in (run / "checkpoints").iterdir()]
    assert len(stopped) == 1 and stopped[0] != "step_00000040", out[-3000:]
    step = int(stopped[0].split("_")[1])
    assert f"stopped at step {step} on SIGUSR1" in out
    # one process stops after the step it is in: the signal came at step `logged` or up to log_interval (5)
    # steps later (the rows are written every 5 steps)
    assert logged < step <= logged + 5 + 1, (logged, step)
    out = check(launch(run, *COMMON, "checkpoint.interval=0"))
    assert f"at step {step}" in out
    assert losses(run) == straight


@pytest.fixture(scope="module")
def clean6(tmp_path_factory):
    """Six steps with nothing injected: the losses the NaN runs are compared with."""
    run = tmp_path_factory.mktemp("clean6") / "run"
    check(launch(run, "train.max_steps=6"))
    return losses(run)


def assert_skipped_step_3(run, clean, rel: float = 0.0) -> None:
    """Step 3 skipped (NaN logged), the others not; steps 1-2 are the clean run's; after the skip the run goes
    on from step 2's weights, so steps 4-6 stay close to the clean run's losses (a bad update would not)."""
    rows = {r["step"]: r for r in metrics(run)}
    assert rows[3].get("skipped") is True and rows[3]["loss"] != rows[3]["loss"]  # NaN
    assert all("skipped" not in rows[s] for s in (1, 2, 4, 5, 6))
    assert all(rows[s]["loss"] == pytest.approx(clean[s], rel=rel, abs=0) for s in (1, 2)), (rows, clean)
    assert all(abs(rows[s]["loss"] - clean[s]) < 0.02 * clean[s] for s in (4, 5, 6)), (rows, clean)


def test_nan_loss_skip_policy_skips_the_step_and_training_goes_on(tmp_path, clean6):
    run = tmp_path / "run"
    out = check(launch(run, "train.max_steps=6", env={"GORILLA_FAULT": "nan:loss@3"}))
    assert "step 3: the loss or gradient norm is not finite (inf/NaN), the update was not applied: skipped" in out
    assert_skipped_step_3(run, clean6)


def test_nan_on_one_rank_of_two_skips_the_step_on_both(tmp_path, clean6):
    """The verdict is global: one rank's NaN reaches every rank's gradients (all-reduce), both skip the
    same step, and both go on in step (they would hang or diverge otherwise)."""
    run = tmp_path / "run"
    out = check(launch(run, "train.max_steps=6", "launch=torchrun", "launch.nproc_per_node=2",
                       "parallel.zero_stage=1", env={"GORILLA_FAULT": "nan:loss@3/1"}))
    assert "step 3: the loss or gradient norm is not finite (inf/NaN), the update was not applied: skipped" in out
    assert_skipped_step_3(run, clean6, rel=1e-5)  # 2 ranks vs 1: the same batch, summed in another order


def test_nan_loss_stop_policy_ends_the_run_and_keeps_the_good_checkpoints(tmp_path):
    run = tmp_path / "run"
    proc = launch(run, "train.max_steps=6", "checkpoint.interval=2", "train.nonfinite=stop",
                  env={"GORILLA_FAULT": "nan:loss@3"})
    assert proc.returncode == 1
    assert "step 3: the loss or gradient norm is not finite (inf/NaN), the update was not applied; stopping " \
           "(train.nonfinite=stop)" in proc.stdout
    assert "Traceback" not in proc.stdout
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000002"]


def test_nan_every_step_stops_after_max_skipped_steps(tmp_path):
    proc = launch(tmp_path / "run", "train.max_steps=10", "train.max_skipped_steps=2",
                  env={"GORILLA_FAULT": "nan:loss"})
    assert proc.returncode == 1
    assert "step 3: the loss or gradient norm is not finite (inf/NaN), the update was not applied, 3 steps in " \
           "a row (train.max_skipped_steps=2): stopping" in proc.stdout


def test_a_hung_rank_ends_the_job_with_the_rank_and_operation_named(tmp_path):
    start = time.monotonic()
    proc = launch(tmp_path / "run", "launch=torchrun", "launch.nproc_per_node=2", "parallel.timeout_s=5", "parallel.census_grace_s=2",
                  "train.max_steps=10", env={"GORILLA_FAULT": "hang:step@3/1"})
    assert proc.returncode == 1 and "exitcode  : 69" in proc.stdout, proc.stdout[-3000:]  # rank 0's 69, via torchrun
    host = socket.gethostname()
    assert f"[rank 0 on {host}] error: all_reduce did not complete within parallel.timeout_s=5 s" in proc.stdout
    assert "another rank is stuck or far behind" in proc.stdout
    assert f"(dead, stuck or unreachable): rank 1 on {host}" in proc.stdout
    assert time.monotonic() - start < 90  # not the default 10 minutes
