"""How workers start. Each backend turns (config, run_dir) into one command line + environment;
all run `gorilla_dist.worker <run_dir>`, and the launcher exits with that command's status."""

from __future__ import annotations

import os
import shutil
import sys

from gorilla_dist.runtime import free_port, single_process_env


def _worker(run_dir: str) -> list[str]:
    return ["-m", "gorilla_dist.worker", run_dir]


def local(cfg, run_dir: str, port: int) -> tuple[list[str], dict]:
    return [sys.executable, *_worker(run_dir)], {**single_process_env(), "MASTER_PORT": str(port)}


def torchrun(cfg, run_dir: str, port: int) -> tuple[list[str], dict]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={cfg.launch.nproc_per_node}",
            "--nnodes=1", "--master_addr=127.0.0.1", f"--master_port={port}", *_worker(run_dir)], {}


def deepspeed(cfg, run_dir: str, port: int) -> tuple[list[str], dict]:
    # --num_gpus is DeepSpeed's word for "ranks on this node"; on a CPU box it starts CPU ranks.
    # --no_local_rank: workers read LOCAL_RANK from the environment like under torchrun.
    runner = shutil.which("deepspeed")
    head = [runner] if runner else [sys.executable, "-m", "deepspeed.launcher.runner"]
    return [*head, f"--num_gpus={cfg.launch.nproc_per_node}", f"--master_port={port}", "--no_local_rank",
            "--module", *_worker(run_dir)[1:]], {}


BACKENDS = {"local": local, "torchrun": torchrun, "deepspeed": deepspeed}


def command(cfg, run_dir: str) -> tuple[list[str], dict]:
    port = cfg.launch.master_port or free_port()
    argv, extra = BACKENDS[cfg.launch.backend](cfg, run_dir, port)
    return argv, {**os.environ, **extra}
