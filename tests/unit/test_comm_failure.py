"""A failed collective becomes one message naming the rank, the operation, our call site and what went
wrong, for gloo's error texts and NCCL's (the worker then exits 69, which the job script may requeue)."""

import pytest
import torch.distributed as dist

from gorilla_dist.parallel import describe_comm_failure

NCCL_PEER_GONE = ("NCCL error in: /pytorch/torch/csrc/distributed/c10d/ProcessGroupNCCL.cpp:3763, remote process "
                  "exited or there was a network error, NCCL version 2.27.5\nncclRemoteError: A call failed possibly "
                  "due to a network error or a remote process exiting prematurely.\nLast error:\nsocketProgressOpt: "
                  "Call to recv from 10.0.0.2<33759> failed : Connection reset by peer")
NCCL_SOCKET = ("NCCL error in: ../torch/csrc/distributed/c10d/ProcessGroupNCCL.cpp:1275, internal error, NCCL version "
               "2.27.5\nncclInternalError: Internal check failed.\nLast error:\nNet : Connection closed by remote peer "
               "node2<50260>")
NCCL_TIMEOUT = ("[Rank 0] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=12, OpType=ALLREDUCE, "
                "NumelIn=1, NumelOut=1, Timeout(ms)=600000) ran for 600023 milliseconds before timing out.")
GLOO_PEER_GONE = "[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:41234"
GLOO_TIMEOUT = "[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 600000ms for recv"


def raised(error: Exception) -> Exception:
    """`error` as raised from inside a torch.distributed call, so its traceback names the operation."""
    def all_reduce():  # (named as the c10d function is; the traceback's innermost distributed_c10d frame)
        raise error
    all_reduce.__code__ = all_reduce.__code__.replace(co_filename=dist.distributed_c10d.__file__)
    try:
        all_reduce()
    except Exception as err:  # noqa: BLE001
        return err


@pytest.mark.parametrize("text", [NCCL_PEER_GONE, NCCL_SOCKET, GLOO_PEER_GONE])
def test_a_lost_peer_is_named_as_such_for_nccl_and_gloo(text):
    cls = getattr(dist, "DistBackendError", RuntimeError) if "NCCL" in text else RuntimeError
    message = describe_comm_failure(raised(cls(text)), 3, 600, grace_s=1)
    assert message.startswith("[rank 3] error: all_reduce failed: a peer rank closed its connection (it crashed or "
                              "was killed; see its log)"), message


@pytest.mark.parametrize("text", [NCCL_TIMEOUT, GLOO_TIMEOUT])
def test_a_timeout_names_parallel_timeout_s_for_nccl_and_gloo(text):
    message = describe_comm_failure(raised(RuntimeError(text)), 0, 600, grace_s=1)
    assert message.startswith("[rank 0] error: all_reduce did not complete within parallel.timeout_s=600 s"), message


def test_other_errors_are_not_communication_failures():
    assert describe_comm_failure(raised(RuntimeError("CUDA out of memory")), 0, 600, grace_s=1) is None
    assert describe_comm_failure(raised(ValueError("Connection closed by peer")), 0, 600, grace_s=1) is None


RANK_SCRIPT = """
import os, sys, time
from types import SimpleNamespace
import torch, torch.distributed as dist
from gorilla_dist.engine.comm import init_process_group
from gorilla_dist.errors import DataError
from gorilla_dist.parallel import on_main

init_process_group(torch.device("cpu"), timeout_s=2, rendezvous_timeout_s=60, deepspeed=False)
layout = SimpleNamespace(is_main=dist.get_rank() == 0, world=2)
# rank 0 works 3x longer than a collective may wait (parallel.timeout_s=2 here)
print("result", on_main(lambda: time.sleep(6) or {"vocab": 7}, layout), flush=True)
def refuse():
    raise DataError("the corpus is empty")
try:
    on_main(refuse, layout)
except DataError as err:
    print("error", err, getattr(err, "printed_elsewhere", False), flush=True)
t = torch.ones(1)
dist.all_reduce(t)  # the group still works
print("sum", int(t.item()), flush=True)
"""


def test_rank0_work_longer_than_the_collective_timeout_does_not_fail_the_others(tmp_path):
    """on_main's other ranks wait through the rendezvous store, not a collective (under NCCL its watchdog would
    abort them after parallel.timeout_s): rank 0 works 6 s with a 2 s collective timeout."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env={**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                                              "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r)})
             for r in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    for rank, (proc, out) in enumerate(zip(procs, outs)):
        assert proc.returncode == 0, out
        assert "result {'vocab': 7}" in out and "sum 2" in out, out
        assert f"error the corpus is empty {rank == 1}" in out, out  # printed once: by rank 0
