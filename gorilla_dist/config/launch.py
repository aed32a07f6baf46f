"""launch and slurm: how the launcher starts the workers, and what it writes into a Slurm job script."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from gorilla_dist.config.checks import choice, positive
from gorilla_dist.errors import ConfigError

BACKENDS = ("local", "torchrun", "deepspeed", "slurm")


@dataclass
class LaunchConfig:
    backend: str = "local"
    """local (one process) | torchrun | deepspeed (this node) | slurm (sbatch; see the slurm group)."""
    nproc_per_node: int = 1
    """Worker processes per node (for slurm: tasks per node, one per GPU on GPU nodes)."""
    nnodes: int = 1
    """torchrun: nodes taking part. Run the same command on each node (same run.dir, on a filesystem every
    node sees); they meet at launch.rdzv_endpoint. Node ranks follow the nodes' host names, sorted. For
    Slurm use slurm.nodes instead."""
    rdzv_endpoint: str | None = None
    """torchrun with nnodes > 1: host:port of the rendezvous, the first node's name or address as every
    node sees it (torchrun's c10d rendezvous; that node hosts it)."""
    master_port: int | None = None
    """Rendezvous port; None picks a free one."""


@dataclass
class SlurmConfig:
    """Used by launch=slurm: the launcher writes run.dir/train.sbatch from slurm/train.sbatch and submits it."""

    nodes: int = 1
    """Nodes to allocate; world size = nodes * launch.nproc_per_node."""
    gpus_per_node: int = 0
    """GPUs per node (--gpus-per-node); 0 for CPU-only nodes. launch.nproc_per_node ranks use GPUs 0..n-1."""
    idle_gpus: bool = False
    """Allow launch.nproc_per_node below slurm.gpus_per_node (GPUs allocated that no rank uses); refused by
    default, as a job that holds GPUs it does not use is usually a typo."""
    cpus_per_task: int | None = None
    """CPU cores per worker; None leaves it to the cluster's default."""
    partition: str | None = None
    account: str | None = None
    time: str | None = None
    """Wall-time limit, e.g. 04:00:00 or 2-00:00:00; None uses the partition's default."""
    job_name: str | None = None
    """Defaults to run.name."""
    signal_seconds: int = 120
    """Ask Slurm for SIGUSR1 this many seconds before the time limit (--signal): the workers save a
    checkpoint at the next step boundary and the job requeues itself."""
    requeue: bool = True
    """After a stop signal and a saved checkpoint, `scontrol requeue` the job so it resumes."""
    requeue_on_failure: bool = False
    """Also requeue when a worker was lost (killed, its node died or became unreachable: the survivors exit
    69, or a task died of a signal), at most slurm.max_restarts times; the job resumes from the newest
    complete checkpoint. Errors (a bad config, a bug, bad data: exit 1 or 2) are never requeued."""
    max_restarts: int = 3
    """requeue_on_failure: requeue at most this many times (Slurm's restart count of the job)."""
    min_nodes: int | None = None
    """Start (and restart after a requeue) on as few as this many nodes when no more are free: sbatch
    --nodes=min_nodes-nodes --exclusive (whole nodes: Slurm then gives as many of the range as are free).
    The checkpoint resumes at the world size it gets with the same global batch (more accumulation
    steps), so train.global_batch_size must divide at every node count in the range."""
    extra: list[str] = field(default_factory=list)
    """More sbatch options, one per item, e.g. "slurm.extra=['--qos=high','--constraint=a100']" (quoted)."""
    submit: bool = True
    """false: write run.dir/train.sbatch and print the sbatch command without submitting."""
    wait: bool = False
    """Follow the job's log until it ends (across requeues) and exit with its status."""



def check_min_nodes(cfg) -> None:
    n = cfg.slurm.min_nodes
    if n is None:
        return
    if cfg.launch.backend != "slurm":
        raise ConfigError(f"slurm.min_nodes={n} is for launch=slurm, not launch={cfg.launch.backend}")
    if not 1 <= n <= cfg.slurm.nodes:
        raise ConfigError(f"slurm.min_nodes={n} must be between 1 and slurm.nodes({cfg.slurm.nodes})")


def _check_nodes(launch) -> None:
    if launch.nnodes > 1 and launch.backend != "torchrun":
        hint = "use slurm.nodes" if launch.backend == "slurm" else "use launch=torchrun (or launch=slurm)"
        raise ConfigError(f"launch.nnodes={launch.nnodes} is for launch=torchrun, not launch={launch.backend}; "
                          f"{hint}")
    if launch.nnodes > 1:
        endpoint = launch.rdzv_endpoint or ""
        host, _, port = endpoint.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"launch.nnodes={launch.nnodes} needs launch.rdzv_endpoint=<host>:<port> (the first "
                              f"node's name or address and a free port, the same on every node), got "
                              f"{launch.rdzv_endpoint!r}")


SLURM_SHAPES = {
    "slurm.job_name": (r"[A-Za-z0-9_.+:@-]{1,200}", "letters, digits and . _ - + : @ (at most 200)"),
    "slurm.partition": (r"[A-Za-z0-9_.-]+(,[A-Za-z0-9_.-]+)*", "a partition name, or several joined by commas"),
    "slurm.account": (r"[A-Za-z0-9_.-]+", "letters, digits and . _ -"),
    "slurm.time": (r"\d+(:\d+){0,2}|\d+-\d+(:\d+){0,2}|UNLIMITED|INFINITE|unlimited|infinite",
                   "minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS (Slurm's --time)"),
    "slurm.extra": (r"--?[A-Za-z][^\s\"'`$;\\]*", "one sbatch option per item, e.g. --qos=high, with no space, "
                    "quote, $, backtick, ; or backslash"),
    "run.dir": (r"[^\s\"'`$;\\]+", "a path with no space, quote, $, backtick, ; or backslash (it is written into "
                "#SBATCH lines)"),
}
"""What launch=slurm renders into run.dir/train.sbatch, and the shapes it accepts (a full match)."""


def check_slurm_value(key: str, value: str, kind: str) -> None:
    """A value written into run.dir/train.sbatch has the shape of its kind (SLURM_SHAPES) or is refused, naming
    the key and the first character that does not belong (a control character, a quote, $, ...)."""
    pattern, shape = SLURM_SHAPES[kind]
    if re.fullmatch(pattern, value):
        return
    bad = next((c for c in value if ord(c) < 32 or ord(c) == 127), None)
    if bad is None:
        bad = next((c for c in value if not re.fullmatch(r"[A-Za-z0-9_.+:@,/=\-\[\]|&*]", c)), None)
    what = ("it is not of that shape" if bad is None else
            f"it contains {'a control character ' if not bad.isprintable() else ''}{bad!r}")
    raise ConfigError(f"{key}={value!r} cannot go into run.dir/train.sbatch (launch=slurm): {what}; expected "
                      f"{shape}")


def slurm_job_name(cfg) -> str:
    """The job's name in run.dir/train.sbatch: slurm.job_name, else run.name."""
    return cfg.slurm.job_name or cfg.run.name


def _validate_slurm(cfg) -> None:
    """Nothing from the config runs as code: every value written into the job script has a shape Slurm
    accepts, and none carries a control character (a newline would start a new line of the script)."""
    s = cfg.slurm
    name_key = "slurm.job_name" if s.job_name is not None else "run.name (the job name unless slurm.job_name is set)"
    values = [(name_key, slurm_job_name(cfg), "slurm.job_name"), ("slurm.partition", s.partition, "slurm.partition"),
              ("slurm.account", s.account, "slurm.account"), ("slurm.time", s.time, "slurm.time"),
              ("run.dir", cfg.run.dir, "run.dir"), *((f"slurm.extra[{i}]", v, "slurm.extra") for i, v in enumerate(s.extra))]
    for key, value, kind in values:
        if value is not None:
            check_slurm_value(key, str(value), kind)


def check_launch(cfg, world: int) -> None:
    """launch and slurm, for a start with `world` ranks."""
    for key, value in (("launch.nproc_per_node", cfg.launch.nproc_per_node), ("slurm.nodes", cfg.slurm.nodes),
                       ("launch.nnodes", cfg.launch.nnodes)):
        positive(value, key)
    for key in ("gpus_per_node", "signal_seconds", "max_restarts"):
        positive(getattr(cfg.slurm, key), f"slurm.{key}", allow_zero=True)
    choice(cfg.launch.backend, BACKENDS, "launch.backend")
    _check_nodes(cfg.launch)
    if cfg.launch.backend == "slurm":
        _validate_slurm(cfg)
    if cfg.launch.backend == "local" and world != 1:
        raise ConfigError(f"launch.backend=local starts one process but launch.nproc_per_node={world}; "
                          "use launch=torchrun or launch=deepspeed for several")
