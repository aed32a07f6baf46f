"""Two nodes on one machine: `bash slurm/dev_cluster.sh start nodes=2` makes two network namespaces
(gd-node1 198.18.0.2, gd-node2 198.18.0.3, their own host names, a private bridge) each running its own
slurmd, and a controller of their own. Ranks on different nodes talk over the bridge, as on a cluster.
This module starts that cluster and stops it when done (unless it was already up); nothing is sent to
an address outside 198.18.0.0/24 and loopback. Needs root (namespaces), as CI has."""

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, check, launch, launcher_args, losses, metrics, slurm_job, wait_until

CONF2 = "/var/lib/gorilla-slurm-2node/slurm.conf"
SLURM2 = {"SLURM_CONF": CONF2}
COMMON = ["optim.warmup_steps=2", "optim.decay_steps=120", "train.max_steps=120", "checkpoint.interval=0",
          "checkpoint.keep=0"]
HOSTS = "[parallel] 2 ranks on 2 hosts: gd-node1 (rank 0), gd-node2 (rank 1)"


def dev_cluster(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "slurm/dev_cluster.sh"), *args], capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def two_nodes():
    if os.geteuid() != 0 or not shutil.which("nsenter"):
        pytest.fail("the two-node cluster needs root (network namespaces) and nsenter (util-linux)")
    already = Path(CONF2).parent.joinpath("slurmctld.pid").is_file()  # someone started it: leave it running
    proc = dev_cluster("start", "nodes=2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    yield
    if not already:
        dev_cluster("stop", "nodes=2")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same training as 2 ranks of torchrun on this host."""
    run = tmp_path_factory.mktemp("torchrun") / "run"
    check(launch(run, *COMMON, "launch=torchrun", "launch.nproc_per_node=2"))
    return losses(run)


def on_node(node: str, *argv: str) -> list[str]:
    return ["bash", str(REPO / "slurm/dev_cluster.sh"), "on", node, *argv]


def job(job_id: str) -> dict:
    return slurm_job(job_id, SLURM2)


def test_a_two_node_slurm_job_trains_exactly_like_two_ranks_on_one_host(two_nodes, reference, tmp_path):
    run = tmp_path / "run"
    out = check(launch(run, *COMMON, "launch=slurm", "slurm.nodes=2", "launch.nproc_per_node=1", "slurm.wait=true",
                       env=SLURM2))
    assert "on gd-node[1-2]: 2 workers" in out and HOSTS in out, out[-3000:]
    assert losses(run) == reference


def test_torchrun_on_two_nodes_trains_exactly_like_two_ranks_on_one_host(two_nodes, reference, tmp_path):
    """One launcher per node, meeting at node 1's c10d rendezvous; the ranks talk over eth0 (the bridge)."""
    run = tmp_path / "run"
    args = launcher_args(run, *COMMON, "launch=torchrun", "launch.nnodes=2", "launch.nproc_per_node=1",
                         "launch.rdzv_endpoint=gd-node1:29400", "parallel.socket_ifname=eth0")
    # one thread per rank as in the reference (torchrun sets it only for several ranks per node): the
    # matmuls then reduce in the same order and the losses are bitwise equal
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    second = subprocess.Popen(on_node("gd-node2", *args), cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    first = subprocess.run(on_node("gd-node1", *args), cwd=REPO, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, timeout=600)
    out2, _ = second.communicate(timeout=120)
    assert first.returncode == 0 and second.returncode == 0, first.stdout[-3000:] + out2[-3000:]
    assert "1 worker(s) on this node of 2" in first.stdout and HOSTS in first.stdout, first.stdout[-3000:]
    assert losses(run) == reference


def test_pipeline_stages_on_two_slurm_nodes_train_exactly_like_on_one_host(two_nodes, tmp_path):
    """parallel.pp=2 on 2 nodes x 1 task: a stage per node, activations and gradients crossing the bridge."""
    steps = [*COMMON, "train.max_steps=20", "parallel.pp=2", "train.micro_batch_size=3"]
    one_host, run = tmp_path / "one_host", tmp_path / "run"
    check(launch(one_host, *steps, "launch=torchrun", "launch.nproc_per_node=2"))
    out = check(launch(run, *steps, "launch=slurm", "slurm.nodes=2", "launch.nproc_per_node=1", "slurm.wait=true",
                       env=SLURM2))
    assert "on gd-node[1-2]: 2 workers" in out and HOSTS in out, out[-3000:]
    assert losses(run) == losses(one_host)


def test_a_preempted_two_node_job_requeues_and_resumes_with_the_same_losses(two_nodes, reference, tmp_path):
    run = tmp_path / "run"
    out = check(launch(run, *COMMON, "launch=slurm", "slurm.nodes=2", "launch.nproc_per_node=1", env=SLURM2))
    job_id = re.search(r"submitted job (\d+)", out).group(1)
    wait_until(lambda: (run / "metrics.jsonl").is_file() and len(metrics(run)) >= 4, "training to start", 120)
    subprocess.run(["scancel", "--signal=USR1", job_id], check=True, env={**os.environ, **SLURM2})
    wait_until(lambda: job(job_id).get("Restarts") == "1" and job(job_id).get("JobState") == "PENDING",
               "the job to requeue itself", 120)
    time.sleep(2)  # not within the second of the requeue (see test_slurm.py)
    subprocess.run(["scontrol", "update", f"jobid={job_id}", "StartTime=now"], check=True,
                   env={**os.environ, **SLURM2})
    wait_until(lambda: job(job_id).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"), "the job to end", 300)
    log = (run / f"slurm-{job_id}.out").read_text()
    assert job(job_id)["JobState"] == "COMPLETED", log[-3000:]
    step = int(re.search(r"stopped at step (\d+) on SIGUSR1", log).group(1))
    assert 0 < step < 120 and f"resumed from {run}/checkpoints/step_{step:08d} at step {step}" in log
    assert log.count(HOSTS) == 2  # both starts on both nodes
    assert losses(run) == reference


def worker_pids(node: str) -> list[int]:
    """The training workers running on a node (processes in its network namespace)."""
    pids = subprocess.run(["ip", "netns", "pids", node], capture_output=True, text=True).stdout.split()
    found = []
    for pid in pids:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"gorilla_dist.worker" in argv:
            found.append(int(pid))
    return found


def scontrol(*args: str) -> None:
    subprocess.run(["scontrol", *args], check=True, env={**os.environ, **SLURM2})


def test_a_lost_node_ends_the_step_naming_it_then_the_job_resumes_on_the_node_left(two_nodes, reference, tmp_path):
    """SIGKILL of node 2's worker mid-run: rank 0 names rank 1 on gd-node2 and exits 69, the job script
    requeues, and with node 2 gone (drained) the job restarts on gd-node1 alone (slurm.min_nodes=1): one
    rank with twice the accumulation resumes the step-40 checkpoint and continues the 2-rank losses."""
    run = tmp_path / "run"
    out = check(launch(run, *COMMON, "launch=slurm", "slurm.nodes=2", "slurm.min_nodes=1", "launch.nproc_per_node=1",
                       "slurm.requeue_on_failure=true", "checkpoint.interval=20", "parallel.timeout_s=60", "parallel.census_grace_s=2", env=SLURM2))
    job_id = re.search(r"submitted job (\d+)", out).group(1)
    try:
        wait_until(lambda: (run / "metrics.jsonl").is_file() and max(losses(run), default=0) >= 45
                   and worker_pids("gd-node2"), "training past the step-40 checkpoint", 180)
        scontrol("update", "nodename=gd-node2", "state=drain", "reason=test_multinode: node lost")
        start = time.monotonic()
        for pid in worker_pids("gd-node2"):
            os.kill(pid, 9)
        wait_until(lambda: job(job_id).get("Restarts") == "1" and job(job_id).get("JobState") == "PENDING",
                   "the job to requeue itself", 120)
        detected = time.monotonic() - start
        time.sleep(2)  # not within the second of the requeue (see test_slurm.py)
        scontrol("update", f"jobid={job_id}", "StartTime=now")
        wait_until(lambda: job(job_id).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"), "the job to end", 300)
    finally:
        scontrol("update", "nodename=gd-node2", "state=resume")
    log = (run / f"slurm-{job_id}.out").read_text()
    assert job(job_id)["JobState"] == "COMPLETED", log[-4000:]
    assert ("[rank 0 on gd-node1] error: " in log and "a peer rank closed its connection" in log
            and "(dead, stuck or unreachable): rank 1 on gd-node2" in log), log[-4000:]
    assert detected < 50  # the census' 2 s, not parallel.timeout_s (60)
    # srun reports the killed task (137) or the survivor's 69, whichever it saw last
    assert re.search(rf"a worker was lost \(status (69|137)\): requeueing job {job_id} \(restart 1 of at most 3\)",
                     log)
    assert "(restart 1) on gd-node1: 1 workers" in log
    step = int(re.search(r"resumed from \S+/step_(\d+) at step", log).group(1))
    assert step >= 40 and step % 20 == 0
    got = losses(run)
    assert got.keys() == reference.keys()
    assert all(got[s] == reference[s] for s in got if s <= step)  # before the loss: 2 ranks, bitwise
    after = [s for s in got if s > step]
    # after: 1 rank accumulating 2 micro-batches instead of 2 ranks summing theirs; float sums only
    assert after and all(got[s] == pytest.approx(reference[s], rel=1e-5) for s in after)


def test_an_unreachable_rendezvous_is_one_clear_error_within_the_timeout(two_nodes, tmp_path):
    # an address on the bridge's network that no node has: nothing answers, nothing leaves the bridge
    run = tmp_path / "run"
    start = time.monotonic()
    proc = subprocess.run(on_node("gd-node2", *launcher_args(run, "launch=torchrun", "launch.nnodes=2",
                                                              "launch.rdzv_endpoint=198.18.0.77:29400",
                                                              "parallel.rendezvous_timeout_s=3")),
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and time.monotonic() - start < 30
    assert ("error: the launcher on gd-node2 could not reach the rendezvous at 198.18.0.77:29400 "
            "(launch.rdzv_endpoint) within parallel.rendezvous_timeout_s=3 s") in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_a_missing_interface_is_refused_naming_the_ones_the_node_has(two_nodes, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.run(on_node("gd-node1", *launcher_args(run, "launch=torchrun", "launch.nproc_per_node=2",
                                                              "parallel.socket_ifname=ib0")),
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "error: parallel.socket_ifname='ib0': no interface ib0 on gd-node1 (it has: lo, eth0)" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_an_unplugged_node_is_named_by_the_survivor_within_the_timeout(two_nodes, tmp_path):
    """Node 2's link goes down mid-run (two torchruns, no Slurm): rank 0's collective times out after
    parallel.timeout_s, its census finds rank 1 silent, and it ends naming gd-node2, status 69 through
    torchrun; the unplugged side cannot reach the store and says so."""
    run = tmp_path / "run"
    args = launcher_args(run, "train.max_steps=100000", "checkpoint.interval=0", "launch=torchrun", "launch.nnodes=2",
                         "launch.nproc_per_node=1", "launch.rdzv_endpoint=gd-node1:29401", "parallel.timeout_s=8",
                         "parallel.census_grace_s=2")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    log2 = tmp_path / "node2.log"  # node 2's output, read while its agent still runs
    with log2.open("w") as sink:
        procs = [subprocess.Popen(on_node(n, *args), cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                  text=True, start_new_session=True)
                 for n, out in (("gd-node1", subprocess.PIPE), ("gd-node2", sink))]
    try:
        wait_until(lambda: (run / "metrics.jsonl").is_file() and len(metrics(run)) >= 2, "training to start", 120)
        subprocess.run(on_node("gd-node2", "ip", "link", "set", "eth0", "down"), check=True)
        start = time.monotonic()
        out1, _ = procs[0].communicate(timeout=120)
        elapsed = time.monotonic() - start
        # the unplugged side: its worker's census waits on the store while the link is down; plugged back in,
        # it finds the store gone (rank 0's host has ended) and reports. Its torchrun agent then waits on the
        # rendezvous that is gone, so it is stopped once the worker has spoken.
        subprocess.run(on_node("gd-node2", "ip", "link", "set", "eth0", "up"), check=True)
        wait_until(lambda: "does not answer either" in log2.read_text(), "node 2's worker to report", 120)
    finally:
        subprocess.run(on_node("gd-node2", "ip", "link", "set", "eth0", "up"), check=True)
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
    procs[1].wait(timeout=60)
    out2 = log2.read_text()
    assert procs[0].returncode == 1 and "exitcode  : 69" in out1, out1[-3000:]  # rank 0's 69, via torchrun
    assert "[rank 0 on gd-node1] error: " in out1 and "did not complete within parallel.timeout_s=8 s" in out1, out1[-3000:]
    assert "(dead, stuck or unreachable): rank 1 on gd-node2" in out1
    assert elapsed < 8 + 2 + 30  # the timeout, the census, slack for a loaded machine
    assert "[rank 1 on gd-node2] error: " in out2, out2[-3000:]
    assert "the rendezvous store on gd-node1 (rank 0's host) does not answer either" in out2
