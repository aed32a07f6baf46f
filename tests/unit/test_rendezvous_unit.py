"""Where ranks meet, without a cluster: the multi-node torchrun command and its config checks, the
reachability check, the host summary; and a rank whose rendezvous never answers (or whose peers never
come) ending with one message in the rendezvous time (real torch.distributed processes on loopback).
The two-node runs are in tests/integration/test_multinode.py."""

import os
import subprocess
import sys
import time

import pytest
import torch
from helpers import REPO, composed

from gorilla_dist.config import ParallelDims, validate, world_size
from gorilla_dist.errors import ConfigError
from gorilla_dist.parallel import ParallelLayout, describe_hosts
from gorilla_dist.rendezvous import RendezvousError, check_interfaces, is_local_address, wait_until_reachable
from gorilla_dist.runtime import free_port
from launcher.backends import torchrun


def test_torchrun_on_several_nodes_meets_at_the_endpoint_with_an_id_every_node_derives_alike():
    cfg = composed("launch=torchrun", "launch.nnodes=2", "launch.nproc_per_node=2", "launch.rdzv_endpoint=n1:29400",
                   "parallel.rendezvous_timeout_s=45", "run.dir=/shared/runs/a")
    argv, _ = torchrun(cfg, cfg.run.dir, 1234)
    assert argv[argv.index("-m") + 1:argv.index("-m") + 2] == ["torch.distributed.run"]
    assert {"--nproc_per_node=2", "--nnodes=2", "--rdzv_backend=c10d", "--rdzv_endpoint=n1:29400",
            "--rdzv_conf=join_timeout=45"} <= set(argv)
    assert [a for a in argv if a.startswith("--rdzv_id=")] == [a for a in torchrun(cfg, "/shared/runs/a", 999)[0]
                                                               if a.startswith("--rdzv_id=")]
    assert world_size(cfg) == 4
    one = composed("launch=torchrun", "launch.nproc_per_node=2")
    assert "--master_addr=127.0.0.1" in torchrun(one, "/r", 1234)[0] and world_size(one) == 2


@pytest.mark.parametrize("overrides,message", [
    (["launch=torchrun", "launch.nnodes=2"], "launch.nnodes=2 needs launch.rdzv_endpoint=<host>:<port>"),
    (["launch=torchrun", "launch.nnodes=2", "launch.rdzv_endpoint=n1"], "got 'n1'"),
    (["launch=torchrun", "launch.nnodes=2", "launch.rdzv_endpoint=n1:99999"], "got 'n1:99999'"),
    (["launch=slurm", "launch.nnodes=2"], "launch.nnodes=2 is for launch=torchrun, not launch=slurm; use slurm.nodes"),
    (["launch.nnodes=2"], "launch.nnodes=2 is for launch=torchrun, not launch=local"),
    (["parallel.rendezvous_timeout_s=0"], "parallel.rendezvous_timeout_s=0.0 must be > 0"),
])
def test_multi_node_settings_that_cannot_work_are_refused(overrides, message):
    with pytest.raises(ConfigError) as err:
        validate(composed(*overrides))
    assert message in str(err.value)


def test_an_impossible_layout_over_nodes_names_where_the_world_size_came_from():
    with pytest.raises(ConfigError) as err:
        validate(composed("launch=torchrun", "launch.nnodes=3", "launch.nproc_per_node=1",
                          "launch.rdzv_endpoint=n1:1", "parallel.tp=2"))
    assert "world size 3 (launch.nnodes(3) * launch.nproc_per_node(1)) is not divisible by parallel.tp(2)" in str(err.value)


def test_reachability_and_local_addresses():
    assert is_local_address("127.0.0.1") and not is_local_address("no-such-host.invalid")
    with pytest.raises(RendezvousError, match="'no-such-host.invalid' .* does not resolve here"):
        wait_until_reachable("no-such-host.invalid", 1, 5, who="w", what="X", hint="h")
    start = time.monotonic()
    with pytest.raises(RendezvousError, match=r"w could not reach the rendezvous at 127.0.0.1:\d+ \(X\) within "
                                              r"parallel.rendezvous_timeout_s=0.5 s \(Connection refused\): h"):
        wait_until_reachable("127.0.0.1", free_port(), 0.5, who="w", what="X", hint="h")
    assert time.monotonic() - start < 3
    check_interfaces("lo")
    with pytest.raises(ConfigError, match=r"parallel.socket_ifname='lo,ib7': no interface ib7 on .* \(it has: .*lo"):
        check_interfaces("lo,ib7")


def test_the_host_summary_groups_ranks_by_host():
    def layout(hosts):
        return ParallelLayout(rank=0, local_rank=0, dims=ParallelDims.build(len(hosts)), tp_rank=0, dp_rank=0,
                              device=torch.device("cpu"), hosts=tuple(hosts))

    assert describe_hosts(layout(["a", "a"])) is None
    assert describe_hosts(layout(["a", "b"])) == "2 ranks on 2 hosts: a (rank 0), b (rank 1)"
    assert (describe_hosts(layout(["a", "a", "a", "b", "b", "a"]))
            == "6 ranks on 2 hosts: a (ranks 0-2,5), b (ranks 3-4)")


JOIN = """
from omegaconf import OmegaConf
from gorilla_dist.config import ParallelConfig
from gorilla_dist.errors import UserError
from gorilla_dist.parallel import init_distributed
cfg = OmegaConf.structured(ParallelConfig)
cfg.rendezvous_timeout_s = 2
try:
    init_distributed(cfg)
except UserError as err:
    print(f"error: {err}")
"""


@pytest.mark.parametrize("rank,expected", [
    ("1", "rank 1 on {host} could not reach the rendezvous at 127.0.0.1:{port} (MASTER_ADDR) within "
          "parallel.rendezvous_timeout_s=2 s (Connection refused): rank 0 did not start there"),
    ("0", "rank 0 on {host} waited parallel.rendezvous_timeout_s=2 s at 127.0.0.1:{port} and 1 of 2 ranks "
          "joined: the others did not start, or cannot reach this host"),
])
def test_a_rank_left_alone_at_the_rendezvous_stops_with_one_message_in_time(rank, expected):
    import socket

    port = free_port()
    env = {**os.environ, "RANK": rank, "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", JOIN], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    elapsed = time.monotonic() - start
    assert expected.format(host=socket.gethostname(), port=port) in proc.stdout, proc.stdout + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert elapsed < 30  # imports (~5 s) + the 2 s wait, not the 600 s collective timeout
