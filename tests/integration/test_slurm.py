"""launch=slurm on a real Slurm controller: this machine as a one-node cluster (`bash slurm/dev_cluster.sh`,
run by .ci/run and the README test command). Jobs are submitted with sbatch, preempted with scancel,
requeued by their own script, and must end with the losses of an uninterrupted torchrun run."""

import re
import shutil
import subprocess
import time

import pytest
from helpers import check, launch, losses, metrics, wait_until
from helpers import slurm_job as job

COMMON = ["launch.nproc_per_node=2", "optim.warmup_steps=2", "optim.decay_steps=300", "train.max_steps=300",
          "checkpoint.interval=0", "checkpoint.keep=0"]


@pytest.fixture(scope="module")
def cluster():
    answers = shutil.which("sinfo") and subprocess.run(["sinfo", "-h"], capture_output=True,
                                                        timeout=20).returncode == 0
    if not answers:
        pytest.fail("no Slurm controller answers: start the one-node test cluster with "
                    "`bash slurm/dev_cluster.sh` (installs slurm-wlm and munge with apt; needs root)")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run = tmp_path_factory.mktemp("torchrun") / "run"
    check(launch(run, *COMMON, "launch=torchrun"))
    return losses(run)


def test_a_two_task_job_trains_exactly_like_torchrun(cluster, reference, tmp_path):
    run = tmp_path / "run"
    # submitted from a shell that has torch.distributed variables of its own: they must not leak into the job
    out = check(launch(run, *COMMON, "launch=slurm", "slurm.wait=true",
                       env={"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}))
    job_id = re.search(r"submitted job (\d+)", out).group(1)
    assert f"job {job_id} ended: COMPLETED, exit 0" in out
    assert "2 workers" in out  # srun started both tasks; they found each other from SLURM_* alone
    assert losses(run) == reference


def test_a_preempted_job_saves_requeues_itself_and_finishes_with_the_same_losses(cluster, reference, tmp_path):
    run = tmp_path / "run"
    job_id = re.search(r"submitted job (\d+)", check(launch(run, *COMMON, "launch=slurm"))).group(1)
    wait_until(lambda: (run / "metrics.jsonl").is_file() and len(metrics(run)) >= 10, "training to start", 120)
    subprocess.run(["scancel", "--signal=USR1", job_id], check=True)  # what --signal=USR1@<s> sends
    wait_until(lambda: job(job_id).get("Restarts") == "1" and job(job_id).get("JobState") == "PENDING",
               "the job to requeue itself", 120)
    # A requeued job waits ~2 minutes before it may start again; let it start now, but not within the
    # second of the requeue: slurmd compares a launch credential's time with the old instance's
    # revocation at 1 s resolution and kills a restart in the same second ("Job credential revoked").
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"jobid={job_id}", "StartTime=now"], check=True)
    wait_until(lambda: job(job_id).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"), "the job to end", 300)
    log = (run / f"slurm-{job_id}.out").read_text()
    assert job(job_id)["JobState"] == "COMPLETED", log[-3000:]
    step = int(re.search(r"stopped at step (\d+) on SIGUSR1", log).group(1))
    assert 0 < step < 300
    assert f"requeueing job {job_id}" in log and "(restart 1)" in log
    assert f"resumed from {run}/checkpoints/step_{step:08d} at step {step}" in log
    assert losses(run) == reference


def test_a_bad_config_fails_fast_with_the_error_in_the_job_log(cluster, tmp_path):
    run = tmp_path / "run"
    check(launch(run, *COMMON, "launch=slurm", "slurm.submit=false"))
    config = run / "config.yaml"  # a hand edit with a typo, then the written script submitted by hand
    config.write_text(config.read_text().replace("max_steps: 300", "max_stepz: 300"))
    start = time.monotonic()
    proc = subprocess.run(["sbatch", "--wait", "--parsable", str(run / "train.sbatch")], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2  # the job's exit status: a config error
    job_id = proc.stdout.strip().split(";")[0]
    log = (run / f"slurm-{job_id}.out").read_text()
    assert "error:" in log and "max_stepz" in log and "Traceback" not in log
    assert job(job_id)["JobState"] == "FAILED" and job(job_id)["Restarts"] == "0"  # not requeued
    assert time.monotonic() - start < 120


def test_an_impossible_layout_is_refused_before_anything_is_submitted(cluster, tmp_path):
    run = tmp_path / "run"
    proc = launch(run, *COMMON, "launch=slurm", "parallel.tp=4")
    assert proc.returncode == 2
    assert "world size 2 (slurm.nodes(1) * launch.nproc_per_node(2)) is not divisible by parallel.tp(4)" in proc.stdout
    assert "submitted" not in proc.stdout and not (run / "train.sbatch").exists()
