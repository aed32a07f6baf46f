"""Slurm pieces that need no cluster: the rendezvous read from a Slurm task's environment, and the job
script the launcher writes (the cluster tests are in tests/integration/test_slurm.py)."""

import re
import subprocess

import pytest
from helpers import composed

from gorilla_dist.config import validate
from gorilla_dist.errors import ConfigError
from gorilla_dist.rendezvous import first_host, from_slurm, port_for_job
from launcher.slurm import render, sbatch_options


@pytest.mark.parametrize("nodelist,host", [("vm", "vm"), ("node3,node1", "node3"), ("gpu-[07-09,12]", "gpu-07"),
                                           ("gpu-[007-010],cpu1", "gpu-007"), ("a[3]", "a3"),
                                           ("rack1-[2-4]", "rack1-2")])
def test_first_host_of_a_slurm_host_list(nodelist, host):
    assert first_host(nodelist) == host


def test_rank_world_and_rendezvous_come_from_the_slurm_step():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0",
           "SLURM_JOB_ID": "123456", "SLURM_JOB_NODELIST": "gpu-[03-06]", "SLURM_STEP_NODELIST": "gpu-[03-06]"}
    assert from_slurm(env) == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu-03",
                               "MASTER_PORT": str(20000 + 123456 % 20000)}
    assert port_for_job("123456") == 23456
    # a launcher's own variables win; outside an srun step (the batch shell) nothing is derived
    assert from_slurm({**env, "RANK": "0"}) == {}
    assert from_slurm({k: v for k, v in env.items() if k != "SLURM_STEP_ID"}) == {}
    assert from_slurm({**env, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}) == {
        "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}


def config(*overrides):
    cfg = composed("launch=slurm", "run.dir=/scratch/run1", *overrides)
    validate(cfg)
    return cfg


def test_the_job_script_carries_the_slurm_config():
    cfg = config("slurm.nodes=4", "slurm.gpus_per_node=8", "launch.nproc_per_node=8", "slurm.partition=gpu",
                 "slurm.time=2-00:00:00", "slurm.cpus_per_task=12", "slurm.signal_seconds=300",
                 "train.global_batch_size=64", "slurm.extra=['--qos=high','--exclusive']")
    opts = sbatch_options(cfg)
    for want in ["--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8", "--partition=gpu", "--time=2-00:00:00",
                 "--cpus-per-task=12", "--signal=USR1@300", "--requeue", "--qos=high", "--exclusive",
                 "--output=/scratch/run1/slurm-%j.out", "--open-mode=append", "--job-name=run1"]:
        assert want in opts
    script = render(cfg, python="/opt/venv/bin/python")
    assert "#SBATCH --nodes=4\n" in script and 'srun --ntasks-per-node="$TASKS_PER_NODE" /opt/venv/bin/python -m gorilla_dist.worker' in script
    assert "RUN_DIR=/scratch/run1\n" in script and "REQUEUE=true\n" in script
    assert not re.findall(r"@[A-Z_]+@", script)  # every template field filled
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0  # valid bash
    assert "--account" not in script and "--gpus-per-node" not in render(config())  # unset: left out


def test_world_size_counts_all_nodes():
    with pytest.raises(ConfigError, match=r"world size 6 \(slurm.nodes\(3\) \* launch.nproc_per_node\(2\)\) "
                                          r"is not divisible by parallel.tp\(4\)"):
        config("slurm.nodes=3", "launch.nproc_per_node=2", "parallel.tp=4", "model.num_heads=4")


def test_a_job_that_may_shrink_asks_for_a_node_range_and_requeues_on_lost_workers_only():
    cfg = config("slurm.nodes=4", "slurm.min_nodes=2", "launch.nproc_per_node=2", "train.global_batch_size=48",
                 "train.micro_batch_size=2",
                 "slurm.requeue_on_failure=true", "slurm.max_restarts=5", "slurm.requeue=false")
    opts = sbatch_options(cfg)
    # whole nodes, the task count left open: Slurm then gives as many nodes of the range as are free
    assert {"--nodes=2-4", "--exclusive", "--requeue"} <= set(opts) and not any("--ntasks" in o for o in opts)
    script = render(cfg)
    assert 'srun --ntasks-per-node="$TASKS_PER_NODE" ' in script and "TASKS_PER_NODE=2\n" in script
    assert "REQUEUE_ON_FAILURE=true\n" in script and "MAX_RESTARTS=5\n" in script
    assert {"--nodes=4", "--ntasks-per-node=1"} <= set(sbatch_options(config("slurm.nodes=4", "slurm.min_nodes=4",
                                                                              "launch.nproc_per_node=1")))
    assert "--no-requeue" in sbatch_options(config("slurm.requeue=false"))


@pytest.mark.parametrize("rc,restarts,requeued", [(69, 0, True), (137, 2, True), (134, 0, True), (69, 3, False),
                                                  (1, 0, False), (2, 0, False), (0, 0, False)])
def test_the_job_script_requeues_a_lost_worker_up_to_max_restarts(tmp_path, rc, restarts, requeued):
    """The script itself, run by bash with srun and scontrol replaced by stubs that log their calls."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f"#!/bin/sh\nexit {rc}\n")
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/scontrol.log\n")
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    script = render(config("slurm.nodes=2", "slurm.min_nodes=1", "slurm.requeue_on_failure=true"))
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SLURM_JOB_ID": "7", "SLURM_RESTART_COUNT": str(restarts),
           "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_JOB_NUM_NODES": "2"}
    proc = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == rc
    log = tmp_path / "scontrol.log"
    assert (log.is_file() and log.read_text() == "requeue 7\n") == requeued, proc.stdout
    if rc == 69 and not requeued:
        assert "(slurm.max_restarts=3): not requeueing again" in proc.stdout
    # NCCL's watchdog aborts the worker (SIGABRT): said as such, and requeued as a lost peer
    assert ("under NCCL, a worker's watchdog ended it" in proc.stdout) == (rc == 134)


@pytest.mark.parametrize("overrides,message", [
    (["slurm.nodes=2", "slurm.min_nodes=1", "parallel.tp=2", "launch.nproc_per_node=1"],
     "world size 1 (1 node (slurm.min_nodes=1) * launch.nproc_per_node(1)) is not divisible by parallel.tp(2)"),
    (["slurm.nodes=3", "slurm.min_nodes=2", "launch.nproc_per_node=1", "train.global_batch_size=4",
      "train.micro_batch_size=2"],
     "train.global_batch_size(4) is not divisible by train.micro_batch_size(2) * data_parallel(3) = 6 (at world "
     "size 3: slurm.nodes(3) * launch.nproc_per_node(1))"),
    (["slurm.nodes=2", "slurm.min_nodes=3"], "slurm.min_nodes=3 must be between 1 and slurm.nodes(2)"),
])
def test_every_node_count_a_job_may_get_is_checked_before_submitting(overrides, message):
    with pytest.raises(ConfigError) as err:
        config(*overrides)
    assert message in str(err.value)


PAYLOADS = {"newline": "x\necho INJECTED > pwned", "semicolon": "x;touch pwned", "substitution": "x$(touch pwned)",
            "backticks": "x`touch pwned`", "carriage return": "x\recho INJECTED"}
FIELDS = {"slurm.job_name": "slurm.job_name", "slurm.partition": "slurm.partition", "slurm.account": "slurm.account",
          "slurm.time": "slurm.time", "slurm.extra": r"slurm.extra\[1\]", "run.dir": "run.dir"}


@pytest.mark.parametrize("field", FIELDS)
@pytest.mark.parametrize("payload", PAYLOADS)
def test_no_config_value_becomes_a_line_or_a_command_of_the_job_script(field, payload):
    value = PAYLOADS[payload]
    cfg = composed("launch=slurm", "run.dir=/scratch/run1")
    if field == "slurm.extra":
        cfg.slurm.extra = ["--qos=high", "--comment=" + value]
    elif field == "run.dir":
        cfg.run.dir = "/scratch/" + value
    else:
        cfg.slurm[field.split(".")[1]] = value
    bad = next(c for c in value if not c.isalnum())
    with pytest.raises(ConfigError, match=FIELDS[field] + r"=.* cannot go into run.dir/train.sbatch .*contains "
                       + ("a control character " if not bad.isprintable() else "") + re.escape(repr(bad))):
        validate(cfg)


def test_the_job_name_from_run_name_is_checked_too_and_good_values_pass():
    cfg = composed("launch=slurm", "run.dir=/scratch/run1")
    cfg.run.name = "a;b"
    with pytest.raises(ConfigError, match=r"run.name \(the job name unless slurm.job_name is set\)='a;b'.*';'"):
        validate(cfg)
    for time in ("30", "30:00", "04:00:00", "2-00", "2-00:00", "2-00:00:00", "UNLIMITED"):
        validate(composed("launch=slurm", f"slurm.time={time}"))
    with pytest.raises(ConfigError, match=r"slurm.time='4h'.*it is not of that shape; expected minutes, MM:SS"):
        validate(composed("launch=slurm", "slurm.time=4h"))
    validate(composed("launch=slurm", "slurm.partition='gpu,gpu-long'", "slurm.account=proj_a-1",
                      "slurm.job_name=pretrain-1.3b_v2", "slurm.extra=['--constraint=a100|h100','--qos=high']"))


def test_a_refused_value_writes_no_script(tmp_path):
    """Through the launcher (the issue's example): exit 2, the error names the key, nothing is written."""
    from helpers import launch

    run = tmp_path / "run"
    proc = launch(run, "launch=slurm", "slurm.submit=false", "slurm.job_name='x\necho INJECTED > file'")
    assert proc.returncode == 2, proc.stdout
    assert "config error: slurm.job_name='x\\necho INJECTED > file' cannot go into run.dir/train.sbatch" in proc.stdout
    assert "a control character '\\n'" in proc.stdout and not run.exists()
