"""Rank and rendezvous from a Slurm step's environment, so `srun python -m gorilla_dist.worker` needs
no torchrun, no ssh and no hostfile: every task knows its rank (SLURM_PROCID), the world
(SLURM_NTASKS), its rank on the node (SLURM_LOCALID), and the job's node list, whose first host is
rank 0's and serves as the rendezvous address.
"""

from __future__ import annotations

import re

from gorilla_dist.errors import ConfigError


def first_host(nodelist: str) -> str:
    """The first host of a Slurm host list: 'gpu-[07-09,12],cpu1' -> 'gpu-07', 'node3,node1' -> 'node3'."""
    m = re.match(r"([^,\[]*)(?:\[([^\]]*)\])?", nodelist.strip())
    if not m or not (m.group(1) or m.group(2)):
        raise ConfigError(f"SLURM_JOB_NODELIST={nodelist!r}: not a Slurm host list")
    prefix, ranges = m.group(1), m.group(2)
    if ranges is None:
        return prefix
    first = ranges.split(",")[0].split("-")[0]  # zero padding is kept: [007-010] -> 007
    return prefix + first


def port_for_job(job_id: str) -> int:
    """A rendezvous port every task of a job derives alike, spread over 20000-39999 by job id."""
    return 20000 + int(job_id) % 20000


def from_slurm(env: dict) -> dict[str, str]:
    """The torch.distributed variables for this Slurm task; empty when not inside an srun step, or when
    a launcher (torchrun, ours) already set RANK. Explicit MASTER_ADDR/MASTER_PORT win."""
    if "RANK" in env or "SLURM_PROCID" not in env or "SLURM_STEP_ID" not in env:
        return {}
    out = {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": env["SLURM_NTASKS"],
           "LOCAL_RANK": env.get("SLURM_LOCALID", "0")}
    if "MASTER_ADDR" not in env:
        out["MASTER_ADDR"] = first_host(env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"])
    if "MASTER_PORT" not in env:
        out["MASTER_PORT"] = str(port_for_job(env["SLURM_JOB_ID"]))
    return out
