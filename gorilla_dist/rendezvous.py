"""Where ranks meet (torch-free: the launcher uses it too).

Under Slurm, `srun python -m gorilla_dist.worker` needs no torchrun, no ssh and no hostfile: every task
knows its rank (SLURM_PROCID), the world (SLURM_NTASKS), its rank on the node (SLURM_LOCALID), and the
job's node list, whose first host is rank 0's and serves as the rendezvous address (`from_slurm`).
An address that does not resolve or answer ends in one message naming it (`wait_until_reachable`).
"""

from __future__ import annotations

import re
import socket
import time

from gorilla_dist.errors import ConfigError, UserError


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


def wait_until_reachable(addr: str, port: int, timeout_s: float, *, who: str, what: str, hint: str) -> None:
    """Resolve addr and connect to addr:port until it answers or `timeout_s` passes; otherwise one
    RendezvousError naming the address (torch's TCPStore client retries with a C++ traceback per try,
    for up to twice as long). `who`: this process ('rank 1 on gd-node2'), `what`: the address's key."""
    try:
        socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise RendezvousError(f"{who}: the rendezvous host {addr!r} ({what}) does not resolve here "
                              f"({err.strerror}); use a name or address every node can resolve") from None
    deadline, last = time.monotonic() + timeout_s, None
    while True:
        left = deadline - time.monotonic()
        try:
            with socket.create_connection((addr, port), timeout=min(5.0, max(left, 0.1))):
                return
        except OSError as err:
            last = err
        if left <= 0:
            break
        time.sleep(min(0.5, max(deadline - time.monotonic(), 0)))
    reason = getattr(last, "strerror", None) or str(last) or type(last).__name__
    raise RendezvousError(f"{who} could not reach the rendezvous at {addr}:{port} ({what}) within "
                          f"parallel.rendezvous_timeout_s={timeout_s:g} s ({reason}): {hint}")


def wait_for_master(addr: str, port: int, timeout_s: float, rank: int) -> None:
    """A rank other than 0, before it joins: rank 0's address answers (see wait_until_reachable)."""
    wait_until_reachable(addr, port, timeout_s, who=f"rank {rank} on {socket.gethostname()}", what="MASTER_ADDR",
                         hint="rank 0 did not start there, or this host has no route to it (check the first "
                              "node's address and parallel.socket_ifname)")


def is_local_address(host: str) -> bool:
    """Whether `host` names an address of this machine (binding to it succeeds)."""
    try:
        infos = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return False
    for family, kind, proto, _, address in infos:
        try:
            with socket.socket(family, kind, proto) as sock:
                sock.bind((address[0], 0))
                return True
        except OSError:
            continue
    return False


def check_interfaces(names: str) -> None:
    """parallel.socket_ifname names interfaces of this host (comma-separated); else a ConfigError."""
    have = [name for _, name in socket.if_nameindex()]
    missing = [n for n in names.split(",") if n not in have]
    if missing:
        raise ConfigError(f"parallel.socket_ifname={names!r}: no interface {', '.join(missing)} on "
                          f"{socket.gethostname()} (it has: {', '.join(have)})")


class RendezvousError(UserError):
    pass
