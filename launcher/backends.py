"""How workers start. Each backend turns (config, run_dir) into one command line + environment;
all run `gorilla_dist.worker <run_dir>`, and the launcher exits with that command's status."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import sys

from gorilla_dist.rendezvous import check_interfaces, is_local_address, wait_until_reachable
from gorilla_dist.runtime import free_port, single_process_env


def _worker(run_dir: str) -> list[str]:
    return ["-m", "gorilla_dist.worker", run_dir]


def local(cfg, run_dir: str, port: int) -> tuple[list[str], dict]:
    return [sys.executable, *_worker(run_dir)], {**single_process_env(), "MASTER_PORT": str(port)}


def torchrun(cfg, run_dir: str, port: int) -> tuple[list[str], dict]:
    head = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={cfg.launch.nproc_per_node}"]
    if cfg.launch.nnodes == 1:
        return [*head, "--nnodes=1", "--master_addr=127.0.0.1", f"--master_port={port}", *_worker(run_dir)], {}
    # several nodes, each running this same command: torchrun's c10d rendezvous, hosted by the node that
    # owns the endpoint's address; the id (the same on every node) is the run directory's
    run_id = hashlib.sha1(os.path.abspath(run_dir).encode()).hexdigest()[:16]
    return [*head, f"--nnodes={cfg.launch.nnodes}", "--rdzv_backend=c10d",
            f"--rdzv_endpoint={cfg.launch.rdzv_endpoint}", f"--rdzv_id={run_id}",
            f"--rdzv_conf=join_timeout={int(cfg.parallel.rendezvous_timeout_s)}", *_worker(run_dir)], {}


def deepspeed(cfg, run_dir: str, port: int) -> tuple[list[str], dict]:
    # --num_gpus is DeepSpeed's word for "ranks on this node"; on a CPU box it starts CPU ranks.
    # --no_local_rank: workers read LOCAL_RANK from the environment like under torchrun.
    runner = shutil.which("deepspeed")
    head = [runner] if runner else [sys.executable, "-m", "deepspeed.launcher.runner"]
    return [*head, f"--num_gpus={cfg.launch.nproc_per_node}", f"--master_port={port}", "--no_local_rank",
            "--module", *_worker(run_dir)[1:]], {}


def check_network(cfg) -> None:
    """Before starting workers on this node: parallel.socket_ifname names its interfaces, and for torchrun
    on several nodes launch.rdzv_endpoint resolves and, on a node that does not host it, answers within
    parallel.rendezvous_timeout_s (else one message; torchrun would print tracebacks)."""
    if cfg.parallel.socket_ifname:
        check_interfaces(cfg.parallel.socket_ifname)
    if cfg.launch.backend != "torchrun" or cfg.launch.nnodes == 1:
        return
    host, _, port = cfg.launch.rdzv_endpoint.rpartition(":")
    if not is_local_address(host):
        wait_until_reachable(host, int(port), cfg.parallel.rendezvous_timeout_s, what="launch.rdzv_endpoint",
                             who=f"the launcher on {socket.gethostname()}",
                             hint="start the same command on the node that owns this address (it hosts the "
                                  "rendezvous), or fix launch.rdzv_endpoint")


BACKENDS = {"local": local, "torchrun": torchrun, "deepspeed": deepspeed}


def command(cfg, run_dir: str) -> tuple[list[str], dict]:
    port = cfg.launch.master_port or free_port()
    argv, extra = BACKENDS[cfg.launch.backend](cfg, run_dir, port)
    return argv, {**os.environ, **extra}
