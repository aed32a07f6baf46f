"""Process groups: torch.distributed + megatron-core parallel_state, set up in one place.

Every `parallel_state` call of the framework lives in this package or in `gorilla_dist/model/spec.py`.
Workers get their rank and world from the environment that torchrun, the deepspeed launcher or the
local backend set (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), or, under `srun`, from
Slurm's own variables (`gorilla_dist.rendezvous.from_slurm`).
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from gorilla_dist.config.parallel import ParallelDims
from gorilla_dist.errors import ConfigError, UserError


@dataclass(frozen=True)
class ParallelLayout:
    """Where this rank sits: its ranks in each parallel dimension, and the sizes (`dims`, the run's
    ParallelDims: world = dp * tp, experts over ep ranks of a data-parallel group)."""

    rank: int
    local_rank: int
    dims: ParallelDims
    tp_rank: int
    dp_rank: int
    device: torch.device
    pp_rank: int = 0
    """This rank's pipeline stage (0: the first, with the embeddings)."""
    hosts: tuple[str, ...] = ()
    """Each rank's host name (index = rank)."""

    @property
    def world(self) -> int:
        return self.dims.world

    @property
    def tp(self) -> int:
        return self.dims.tp

    @property
    def dp(self) -> int:
        return self.dims.dp

    @property
    def pp(self) -> int:
        return self.dims.pp

    @property
    def ep(self) -> int:
        return self.dims.ep

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def backend(self) -> str:
        return "nccl" if self.device.type == "cuda" else "gloo"


def device_type(setting: str) -> str:
    """"cuda" or "cpu": what parallel.device (auto | cpu | cuda) asks for on this machine (no CUDA context is
    made); the worker sets DeepSpeed's accelerator from it before DeepSpeed loads, pick_device the rank's GPU."""
    return "cuda" if setting != "cpu" and torch.cuda.is_available() else "cpu"


def pick_device(setting: str, local_rank: int, cuda: bool, gpus: int) -> torch.device:
    """parallel.device for the rank with this LOCAL_RANK, given whether torch sees CUDA and how many GPUs:
    rank i of a node takes GPU i; one clear error where that cannot be."""
    if setting == "cpu" or (setting == "auto" and not cuda):
        return torch.device("cpu")
    if not cuda:
        raise ConfigError("parallel.device=cuda but torch finds no usable GPU here (torch.cuda.is_available() is "
                          "False); use parallel.device=cpu or auto")
    if local_rank >= gpus:
        raise ConfigError(f"LOCAL_RANK={local_rank}, but this node has {gpus} GPU{'s' if gpus != 1 else ''} visible: each "
                          f"rank needs its own GPU, so at most {gpus} ranks per node (launch.nproc_per_node; under Slurm "
                          "the tasks per node); use fewer ranks per node, or parallel.device=cpu")
    return torch.device("cuda", local_rank)


def init_distributed(parallel_cfg, *, deepspeed: bool = True) -> ParallelLayout:
    """Start torch.distributed (through DeepSpeed, so its comm layer is initialised too; deepspeed=False
    for a process that trains nothing) and megatron-core's tensor/data-parallel groups."""
    from megatron.core import parallel_state as ps

    from gorilla_dist.engine.comm import init_process_group
    from gorilla_dist.rendezvous import RendezvousError, from_slurm, wait_for_master

    os.environ.update(from_slurm(dict(os.environ)))
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise ConfigError(f"environment variable {var} is not set: start workers with `python -m launcher`")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available()
    device = pick_device(getattr(parallel_cfg, "device", "auto"), local_rank, cuda, torch.cuda.device_count() if cuda else 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before the process group: NCCL binds to the current device
    dims = ParallelDims.build(world, tp=parallel_cfg.tp, pp=getattr(parallel_cfg, "pp", 1), ep=parallel_cfg.ep,
                              source="WORLD_SIZE")
    use_interface(parallel_cfg.socket_ifname)
    addr, port, wait = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), parallel_cfg.rendezvous_timeout_s
    if rank != 0:
        wait_for_master(addr, port, wait, rank)
    try:
        init_process_group(device, parallel_cfg.timeout_s, wait, deepspeed=deepspeed)
    except dist.DistStoreError as err:  # rank 0: the others did not all join in time
        joined = re.search(r"(\d+)/(\d+) clients joined", str(err))
        count = f"{joined.group(1)} of {joined.group(2)} ranks joined" if joined else str(err)
        raise RendezvousError(f"rank {rank} on {socket.gethostname()} waited parallel.rendezvous_timeout_s={wait:g} s "
                              f"at {addr}:{port} and {count}: the others did not start, or cannot reach this host "
                              "(see their logs; check MASTER_ADDR and parallel.socket_ifname)") from None
    hosts = [None] * world
    dist.all_gather_object(hosts, socket.gethostname())
    # megatron's groups get their own timeout (30 min by default): give them ours
    ps.initialize_model_parallel(tensor_model_parallel_size=dims.tp, pipeline_model_parallel_size=dims.pp,
                                 context_parallel_size=dims.cp, expert_model_parallel_size=dims.ep,
                                 distributed_timeout_minutes=parallel_cfg.timeout_s / 60)
    if ps.get_data_parallel_world_size() != dims.dp:  # megatron's rank order is ours (tp innermost)
        raise RuntimeError(f"megatron-core made a data-parallel group of {ps.get_data_parallel_world_size()} ranks "
                           f"for {dims.describe()}")
    return ParallelLayout(rank=rank, local_rank=local_rank, dims=dims, tp_rank=ps.get_tensor_model_parallel_rank(),
                          dp_rank=ps.get_data_parallel_rank(), device=device, hosts=tuple(hosts),
                          pp_rank=ps.get_pipeline_model_parallel_rank())


def use_interface(names: str | None) -> None:
    """parallel.socket_ifname: the interface(s) gloo and NCCL bind to, checked against this host's."""
    from gorilla_dist.rendezvous import check_interfaces

    if not names:
        return
    check_interfaces(names)
    os.environ["GLOO_SOCKET_IFNAME"] = os.environ["NCCL_SOCKET_IFNAME"] = names


def describe_hosts(layout: ParallelLayout) -> str | None:
    """'2 ranks on 2 hosts: gd-node1 (rank 0), gd-node2 (rank 1)'; None on one host."""
    by_host = _by_host(range(layout.world), layout.hosts)
    if len(by_host) < 2:
        return None
    parts = [f"{host} ({ranks})" for host, ranks in by_host.items()]
    return f"{layout.world} ranks on {len(by_host)} hosts: {', '.join(parts)}"


def _by_host(ranks, hosts: tuple[str, ...]) -> dict[str, str]:
    """{host: 'rank 3' or 'ranks 0-2,5'} for these ranks, hosts in order of first appearance."""
    grouped: dict[str, list[int]] = {}
    for rank in ranks:
        grouped.setdefault(hosts[rank], []).append(rank)
    return {host: f"rank{'s' if len(rs) > 1 else ''} {_ranges(rs)}" for host, rs in grouped.items()}


def _ranges(ranks: list[int]) -> str:
    out, start = [], ranks[0]
    for a, b in zip(ranks, ranks[1:] + [None]):
        if b != a + 1:
            out.append(str(start) if start == a else f"{start}-{a}")
            start = b
    return ",".join(out)



def init_single_process(device: str = "auto", *, deepspeed: bool = True) -> ParallelLayout:
    """torch.distributed (gloo or nccl, world of one) + megatron parallel_state with the default layout, in
    this process: in-process tests and benchmarks. RANK, WORLD_SIZE and MASTER_* are set only while it
    starts (processes started later must not inherit them); LOCAL_RANK stays, because DeepSpeed's
    accelerator reads it at every device lookup. `device`: parallel.device (the CPU suite pins cpu);
    `deepspeed`: init_distributed's (False for a process that trains nothing)."""
    from unittest import mock

    from omegaconf import OmegaConf

    from gorilla_dist.config import ParallelConfig
    from gorilla_dist.runtime import single_process_env

    env = single_process_env()
    with mock.patch.dict(os.environ, env):
        layout = init_distributed(OmegaConf.structured(ParallelConfig(device=device)), deepspeed=deepspeed)
    os.environ["LOCAL_RANK"] = env["LOCAL_RANK"]
    return layout

def on_main(fn, layout: ParallelLayout):
    """Run `fn` on rank 0 only (work that writes or reads shared files once), then make every rank
    agree on how it went: every rank returns rank 0's result (so keep it small and picklable), and a
    UserError on rank 0 is raised on all ranks (printed once, by rank 0), so a bad input stops the whole
    job with its own message instead of peers dying on a broken collective. The others wait through the
    rendezvous store, as long as rank 0 takes (engine/comm.share_from_main: no collective timeout, no NCCL
    watchdog)."""
    result, error = None, None
    if layout.is_main:
        try:
            result = fn()
        except UserError as err:
            error = err
    if dist.is_initialized() and layout.world > 1:
        from gorilla_dist.engine.comm import share_from_main

        result, shared = share_from_main((result, None if error is None else (type(error), str(error))),
                                         layout.is_main)
        if shared is not None and error is None:
            error = shared[0](shared[1])
            error.printed_elsewhere = True
    if error is not None:
        raise error
    return result


def tp_all_gather(tensor: torch.Tensor) -> list[torch.Tensor]:
    """This rank's shard and its tensor-parallel peers' shards, in TP-rank order (the caller
    concatenates them along the dimension the tensor was split on)."""
    from megatron.core import parallel_state as ps

    shards = [torch.empty_like(tensor) for _ in range(ps.get_tensor_model_parallel_world_size())]
    dist.all_gather(shards, tensor.contiguous(), group=ps.get_tensor_model_parallel_group())
    return shards


def dp_group(layout: ParallelLayout):
    """The data-parallel process group (None when dp == 1)."""
    if layout.dp == 1:
        return None
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_group()


def dp_sum(tensor: torch.Tensor, layout: ParallelLayout) -> torch.Tensor:
    """Sum of `tensor` over the data-parallel ranks, in place (one collective; no-op when dp == 1)."""
    if layout.dp > 1:
        from megatron.core import parallel_state as ps

        dist.all_reduce(tensor, group=ps.get_data_parallel_group())
    return tensor


def pp_sum(tensor: torch.Tensor, layout: ParallelLayout) -> torch.Tensor:
    """Sum of `tensor` over this rank's pipeline stages, in place (one collective; no-op when pp == 1): what
    the last stage computed (the loss), on every stage."""
    if layout.pp > 1:
        from megatron.core import parallel_state as ps

        dist.all_reduce(tensor, group=ps.get_pipeline_model_parallel_group())
    return tensor


def over_stages(obj) -> list:
    """`obj` (any picklable value) of every pipeline stage of this rank's pipeline, in stage order: one
    all_gather_object over the pipeline group (no communication, [obj], without stages or outside a
    distributed run). For start-up numbers, not per step."""
    from megatron.core import parallel_state as ps

    if not (dist.is_initialized() and ps.model_parallel_is_initialized()):
        return [obj]
    size = ps.get_pipeline_model_parallel_world_size()
    if size == 1:
        return [obj]
    every = [None] * size
    dist.all_gather_object(every, obj, group=ps.get_pipeline_model_parallel_group())
    return every


def dp_mean(tensor: torch.Tensor, layout: ParallelLayout) -> torch.Tensor:
    """Mean of `tensor` over the data-parallel ranks, in place (one collective; no-op when dp == 1)."""
    return dp_sum(tensor, layout).div_(layout.dp)


_TIMEOUT = ("Timed out", "timed out", "Timeout(ms)", "timeout")
# gloo's texts, then NCCL's: a DistBackendError "NCCL error in: ...ProcessGroupNCCL.cpp:N, remote process exited
# or there was a network error, NCCL version ... ncclRemoteError: ...", or its socket layer's "Connection closed
# by remote peer" inside an ncclInternalError
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Connection refused",
              "remote process exited or there was a network error", "ncclRemoteError",
              "Connection closed by remote peer")


def describe_comm_failure(err: BaseException, rank: int, timeout_s: float, hosts: tuple[str, ...] = (), *,
                          grace_s: float) -> str | None:
    """A message for people when a collective failed (timed out, or a peer's connection closed),
    naming this rank, the operation, where our code called it, and the ranks (and hosts) that no longer
    answer; None for any other error. The operation comes from the traceback: the innermost
    torch.distributed function on it. The lost ranks come from a census through the rendezvous store
    (engine/comm.py census) when the ranks' hosts are known (the process group had started)."""
    text = str(err)
    timed_out = any(s in text for s in _TIMEOUT)
    peer_gone = any(s in text for s in _PEER_GONE)
    if not isinstance(err, RuntimeError) or not (timed_out or peer_gone):
        return None
    op, caller, tb = "a collective", None, err.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_filename.endswith("distributed_c10d.py"):
            op = code.co_name
        elif "gorilla_dist" in code.co_filename:
            caller = f"{os.path.basename(code.co_filename)}:{tb.tb_lineno} {code.co_name}"
        tb = tb.tb_next
    where = f" (called from {caller})" if caller else ""
    here = f"[rank {rank}{' on ' + hosts[rank] if hosts else ''}] error: "
    lost = _lost(rank, hosts, grace_s) if hosts else ""
    if timed_out:
        return (f"{here}{op} did not complete within parallel.timeout_s={timeout_s:g} s{where}: another rank is "
                f"stuck or far behind, or gone{'; ' + lost if lost else ''}; its log shows where. Raise "
                f"parallel.timeout_s if ranks are merely slow (e.g. a long first compile). [{text.strip()[:200]}]")
    return (f"{here}{op} failed{where}: a peer rank closed its connection (it crashed or was killed; see its "
            f"log){'; ' + lost if lost else ''}. [{text.strip()[:200]}]")


def _lost(rank: int, hosts: tuple[str, ...], grace_s: float) -> str:
    """'not answering ...: rank 1 on gd-node2', from a census of the ranks still answering; '' when all do."""
    from gorilla_dist.engine.comm import census

    alive = census(rank, len(hosts), grace_s)
    if alive is None:
        return (f"the rendezvous store on {hosts[0]} (rank 0's host) does not answer either: rank 0 is gone or "
                "its host is unreachable from here")
    gone = [r for r in range(len(hosts)) if r not in alive]
    if not gone:
        return ""
    named = "; ".join(f"{ranks} on {host}" for host, ranks in _by_host(gone, hosts).items())
    return f"not answering within {grace_s:g} s (dead, stuck or unreachable): {named}"


def teardown() -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
